"""PAT: one CPU training step with CNN, ViT, MLP, Swin and CLIP teachers at 32 px; the prompts live only in PAT's own
teacher pass, start as the identity, never touch the teacher's weights, and keep their feedback across a resume."""

import gc

import pytest
import timm
import torch

from pand.distillers import Progress, TeacherContext, build_distiller
from pand.distillers.pat import PAT
from pand.engine.teacher_side import add_stages
from pand.rules import check_rules
from pand.students import build_student
from pand.teachers import LOGITS, STAGE_FEATURES, LiveTeacherSource, ZeroShotLogits
from pand.teachers.classifier import ClassifierTeacher

C = 5
MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
SMALL = {"name": "pat", "embed_dim": 32, "num_heads": 4}  # the default 512-wide attention is needlessly slow here


def _classifier(family: str) -> ClassifierTeacher:
    torch.manual_seed(0)
    size = None
    if family == "cnn":
        model = timm.create_model("test_resnet", num_classes=C)
    elif family == "vit":
        model, size = timm.create_model("test_vit", num_classes=C), 160  # batches are resized to its input
    elif family == "mlp":
        from timm.models.mlp_mixer import MlpMixer

        model = MlpMixer(num_classes=C, img_size=32, patch_size=8, num_blocks=2, embed_dim=64)
    else:  # a tiny Swin: its stages pass channels-last maps [B, H, W, C]
        model = timm.create_model("swin_tiny_patch4_window7_224", num_classes=C, img_size=32, window_size=2,
                                  embed_dim=16, depths=(1, 1, 1), num_heads=(1, 1, 1))
    return ClassifierTeacher(model, num_classes=C, image_size=size, mean=MEAN, std=STD,
                             identity={"kind": "classifier", "model": family})


def _student():
    torch.manual_seed(1)
    student = build_student("test_resnet", C, source="timm", pretrained=False)
    student.input_size = (3, 32, 32)
    return student


def _pat(teacher, source=None, context=None, **options) -> tuple[PAT, torch.nn.Module]:
    live = LiveTeacherSource(teacher, MEAN, STD)
    context = context or TeacherContext(identity=teacher.identity, num_classes=C)
    add_stages(context, live, 32, with_model=True)
    return build_distiller({**SMALL, **options}, _student(), C, context), source or live


def _batch(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"image": torch.randn(n, 3, 32, 32, generator=gen), "label": torch.arange(n) % C}


def _step(distiller, source, batch):
    out = distiller.training_losses(batch, source(batch, distiller.requires), Progress(0, 1))
    assert set(out.losses) == {"ce", "kd", "pat_mse", "pat_reg"}
    assert all(torch.isfinite(v) for v in out.losses.values()), out.losses
    return out


def _check_gradients(distiller, teacher):
    trainable = [(n, p) for n, p in distiller.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and torch.isfinite(p.grad).all() for _, p in trainable), [
        n for n, p in trainable if p.grad is None]
    # beta starts at 0, so only beta (not yet the blocks behind it) gets a nonzero gradient in the first step
    assert all(p.beta.grad.abs() > 0 for p in distiller.prompts)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())


@pytest.mark.parametrize("family", ["cnn", "vit", "mlp", "swin"])
def test_one_training_step(family):
    teacher = _classifier(family)
    distiller, source = _pat(teacher)
    assert len(distiller.prompts) == len(distiller.aligners) == len(distiller.stage_names) > 0
    out = _step(distiller, source, _batch())
    sum(out.losses.values()).backward()
    _check_gradients(distiller, teacher)
    assert all(p.feedback.abs().sum() > 0 for p in distiller.prompts)
    # the teacher is no part of the distiller: not in its parameters, not in its checkpoint
    teacher_params = {id(p) for p in teacher.parameters()}
    assert not teacher_params & {id(p) for p in distiller.parameters()}
    assert {k.split(".")[0] for k in distiller.state_dict()} == {"student", "region", "aligners", "prompts"}


def test_channels_last_teacher_prompts_work_in_its_order():
    distiller, _ = _pat(_classifier("swin"))
    assert [p.order for p in distiller.prompts] == ["NHWC"] * len(distiller.prompts)


@pytest.mark.parametrize("family", ["cnn", "vit"])
def test_prompted_teacher_is_exactly_the_plain_one_at_init(family):
    teacher = _classifier(family)
    distiller, source = _pat(teacher)
    batch = _batch()
    plain = source(batch, {LOGITS, STAGE_FEATURES})
    logits, feats = distiller.prompted_teacher(batch["image"])
    assert logits.requires_grad  # the prompted pass is differentiable
    assert torch.equal(logits, plain[LOGITS])
    assert all(torch.equal(f, plain[STAGE_FEATURES][i]) for f, i in zip(feats, distiller.teacher_stage_index))


def test_the_plain_teacher_pass_never_sees_the_prompts():
    teacher = _classifier("cnn")
    weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    distiller, source = _pat(teacher)
    batch = _batch()
    before = source(batch, {LOGITS, STAGE_FEATURES})
    with torch.no_grad():
        for prompt in distiller.prompts:
            prompt.beta.fill_(1.0)
    sum(_step(distiller, source, batch).losses.values()).backward()  # feedback is now nonzero too
    after = source(batch, {LOGITS, STAGE_FEATURES})
    assert torch.equal(before[LOGITS], after[LOGITS])
    assert all(torch.equal(a, b) for a, b in zip(before[STAGE_FEATURES], after[STAGE_FEATURES]))
    with torch.no_grad():
        assert not torch.allclose(distiller.prompted_teacher(batch["image"])[0], before[LOGITS])
    assert all(torch.equal(v, weights[k]) for k, v in teacher.state_dict().items())


def test_feedback_resumes_from_a_checkpoint_and_fits_a_smaller_batch():
    teacher = _classifier("cnn")
    distiller, source = _pat(teacher)
    _step(distiller, source, _batch())
    state = distiller.state_dict()
    assert all(f"prompts.{i}.feedback" in state for i in range(len(distiller.prompts)))
    resumed, _ = _pat(teacher)
    resumed.load_state_dict(state)
    assert all(torch.equal(a.feedback, b.feedback) for a, b in zip(distiller.prompts, resumed.prompts))
    out = _step(resumed, source, _batch(n=2, seed=1))  # a last batch of another size
    sum(out.losses.values()).backward()


def test_teacher_stages_pair_deepest_first():
    distiller, source = _pat(_classifier("cnn"), teacher_stages=[1, 3])
    assert distiller.teacher_stage_index == [1, 3]
    assert distiller.stage_names == ["backbone.layer3", "backbone.layer4"]
    assert len(distiller.prompts) == 2
    _step(distiller, source, _batch())


def test_hooks_leave_with_the_distiller():
    teacher = _classifier("cnn")
    modules = dict(teacher.stage_root.named_modules())
    distiller, _ = _pat(teacher)
    hooked = [modules[teacher.stage_names[i]] for i in distiller.teacher_stage_index]
    assert all(len(m._forward_pre_hooks) == 1 for m in hooked)
    del distiller
    gc.collect()
    assert all(len(m._forward_pre_hooks) == 0 for m in hooked)


@pytest.mark.parametrize("batch_first", [True, False])
def test_clip_teacher_one_training_step(tiny_teacher, batch_first):
    transformer = tiny_teacher.model.visual.transformer
    transformer.batch_first = batch_first  # False: the blocks pass sequence-first tokens [N, B, C]
    # named explicitly (not the default stages), and read anew in that order
    tiny_teacher.use_stages(["transformer.resblocks.0", "transformer.resblocks.1"])
    try:
        text = tiny_teacher.class_embeddings([f"class {i}" for i in range(C)], ["a photo of a {}."])
        context = TeacherContext(embed_dim=tiny_teacher.embed_dim, logit_scale=tiny_teacher.logit_scale,
                                 text_embeds=text, identity=tiny_teacher.identity)
        source = ZeroShotLogits(LiveTeacherSource(tiny_teacher, MEAN, STD), text, tiny_teacher.logit_scale)
        distiller, _ = _pat(tiny_teacher, source, context)
        assert [p.order for p in distiller.prompts] == [None if batch_first else "NBC"] * len(distiller.prompts)
        batch = _batch()
        with torch.no_grad():
            torch.testing.assert_close(distiller.prompted_teacher(batch["image"])[0], source(batch, {LOGITS})[LOGITS])
        out = _step(distiller, source, batch)
        sum(out.losses.values()).backward()
        _check_gradients(distiller, tiny_teacher)
        del distiller
        gc.collect()
    finally:
        transformer.batch_first = True
        tiny_teacher.use_stages(None)


@pytest.mark.parametrize("method, problem", [
    ({"teacher_stages": [2, 1]}, "teacher_stages"),
    ({"teacher_stages": [-1]}, "teacher_stages"),
    ({"teacher_stages": []}, "teacher_stages"),
    ({"embed_dim": 30, "num_heads": 8}, "multiple"),
])
def test_bad_structure_options_are_refused(method, problem):
    errors = PAT.check_config({"method": {"name": "pat", **method}})
    assert len(errors) == 1 and problem in errors[0]


def test_option_ranges():
    good = {"temperature": 1.0, "ce_weight": 0.0, "reg_weight": 1.0, "embed_dim": 512, "num_heads": 8, "grid": 4}
    assert check_rules(good, PAT.option_rules) == [] and PAT.check_config({"method": good}) == []
    bad = {"temperature": 0.0, "mse_weight": -1.0, "grid": 0, "num_heads": 1.5}
    assert len(check_rules(bad, PAT.option_rules)) == 4
