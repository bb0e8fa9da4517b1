import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError
from pand.stage1.learner import PromptLearner
from pand.teachers import load_clip_teacher

NAMES = ["cat", "red winged blackbird", "T-shirt/top", "Mr."]


@pytest.fixture(scope="module", params=["pand-tiny-vit", "pand-tiny-customtext"])
def teacher(request):
    torch.manual_seed(0)
    return load_clip_teacher(request.param, "random")


def _reference(model, tokenizer, names, phrase="a photo of a", context_length=None):
    tokens = tokenizer([f"{phrase} {n}." for n in names], context_length=context_length)
    with torch.no_grad():
        return F.normalize(model.encode_text(tokens).float(), dim=-1)


def test_trailing_period_is_its_own_token(teacher):
    # "cat." tokenises as "cat" + "." (the prompt's "." is a separate token, as in CoOp's "X X X X cat.").
    tok = teacher.tokenizer
    assert torch.equal(tok(["a photo of a cat."]), tok(["a photo of a cat ."]))


def test_ctx_init_reproduces_encode_text_exactly(teacher):
    learner = PromptLearner(teacher.model, teacher.tokenizer, NAMES, ctx_init="a photo of a")
    assert learner.n_ctx == 4
    assert learner.ctx.shape == (4, learner.text_tower.width)
    with torch.no_grad():
        out = learner()
    assert out.dtype == torch.float32
    ref = _reference(teacher.model, teacher.tokenizer, NAMES)
    assert out.shape == ref.shape == (len(NAMES), teacher.embed_dim)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(NAMES)))


def test_ctx_init_csc_reproduces_encode_text(teacher):
    learner = PromptLearner(teacher.model, teacher.tokenizer, NAMES, ctx_init="a photo of a", csc=True)
    assert learner.ctx.shape == (len(NAMES), 4, learner.text_tower.width)
    with torch.no_grad():
        torch.testing.assert_close(learner(), _reference(teacher.model, teacher.tokenizer, NAMES), atol=1e-5, rtol=0)


def test_accepts_clip_teacher_wrapper(teacher):
    learner = PromptLearner(teacher, teacher.tokenizer, NAMES[:2], ctx_init="a photo of a")
    with torch.no_grad():
        torch.testing.assert_close(
            learner(), _reference(teacher.model, teacher.tokenizer, NAMES[:2]), atol=1e-5, rtol=0
        )


@pytest.mark.parametrize("model_cls", ["CLIP", "CustomTextCLIP"])
@pytest.mark.parametrize(
    "text_extra",
    [
        {"proj_bias": True},  # text_projection is an nn.Linear
        {"pool_type": "eos", "eos_id": 49407},
        {"pool_type": "last"},
        {"no_causal_mask": True, "pool_type": "first"},
    ],
)
def test_exact_on_text_tower_variants(model_cls, text_extra):
    _check_variant(model_cls, text_extra)


def test_exact_with_appended_cls_token():
    _check_variant("CustomTextCLIP", {"embed_cls": True})  # CoCa-style appended class token


def _check_variant(model_cls, text_extra):
    import open_clip.model as ocm

    torch.manual_seed(0)
    vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}
    text = {"context_length": 24, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1, **text_extra}
    model = getattr(ocm, model_cls)(32, vision, text).eval()
    if model_cls == "CustomTextCLIP" and text_extra.get("no_causal_mask"):
        model.text.use_pad_mask = True
    import open_clip

    tok = open_clip.get_tokenizer("ViT-B-32")
    learner = PromptLearner(model, tok, NAMES, ctx_init="a photo of a")
    with torch.no_grad():
        torch.testing.assert_close(learner(), _reference(model, tok, NAMES, context_length=24), atol=1e-5, rtol=0)


def test_only_ctx_is_trainable_and_gets_gradients(tiny_teacher):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=6)
    assert learner.ctx.shape == (6, learner.text_tower.width)
    trainable = [p for p in learner.parameters() if p.requires_grad]
    assert len(trainable) == 1 and trainable[0] is learner.ctx
    assert list(learner.state_dict()) == ["ctx"]
    assert all(not p.requires_grad for p in tiny_teacher.model.parameters())

    feats = F.normalize(torch.randn(8, tiny_teacher.embed_dim), dim=-1)
    labels = torch.arange(8) % len(NAMES)
    loss = F.cross_entropy(tiny_teacher.logit_scale * feats @ learner().t(), labels)
    loss.backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_teacher.model.parameters())


def test_random_init_statistics(tiny_teacher):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, ["a"] * 50, n_ctx=16, csc=True)
    assert learner.ctx.shape == (50, 16, learner.text_tower.width)
    assert abs(float(learner.ctx.detach().std()) - 0.02) < 0.002
    assert abs(float(learner.ctx.detach().mean())) < 0.002


def test_csc_gives_per_class_context_and_gradients(tiny_teacher):
    torch.manual_seed(0)
    learner = PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=4, csc=True)
    assert learner.ctx.shape == (len(NAMES), 4, learner.text_tower.width)
    out = learner()
    assert out.shape == (len(NAMES), tiny_teacher.embed_dim)
    out[0].sum().backward()
    grad = learner.ctx.grad
    assert grad[0].abs().sum() > 0
    assert torch.all(grad[1:] == 0)  # class 0's features depend only on class 0's context


@pytest.mark.parametrize("csc", [False, True])
def test_positions_valid_and_different(tiny_teacher, csc):
    outs = {}
    for position in ("end", "middle", "front"):
        torch.manual_seed(0)
        learner = PromptLearner(
            tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=4, csc=csc, class_token_position=position
        )
        with torch.no_grad():
            out = learner()
        assert out.shape == (len(NAMES), tiny_teacher.embed_dim)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out.norm(dim=-1), torch.ones(len(NAMES)))
        outs[position] = out
    assert not torch.allclose(outs["end"], outs["middle"], atol=1e-4)
    assert not torch.allclose(outs["end"], outs["front"], atol=1e-4)
    assert not torch.allclose(outs["middle"], outs["front"], atol=1e-4)


def test_context_lands_where_the_layout_says(tiny_teacher):
    # The tokens outside the context positions are those of the sentence; the context sits right after SOS
    # ("end"), after the class tokens ("front") or around them ("middle").
    tok = tiny_teacher.tokenizer
    for position, expect in [("end", [1, 2, 3, 4]), ("front", [2, 3, 4, 5]), ("middle", [1, 2, 4, 5])]:
        learner = PromptLearner(tiny_teacher.model, tok, ["cat"], n_ctx=4, class_token_position=position)
        assert learner.ctx_positions[0].tolist() == expect
        ids = learner.tokenized_prompts[0].tolist()
        cat = tok(["cat"])[0, 1].item()
        assert ids[0] == tok.sot_token_id and cat in ids and tok.eot_token_id in ids


def test_too_long_class_name_raises_naming_it(tiny_teacher):
    long_name = " ".join(["verylongword"] * 40)
    with pytest.raises(ConfigError, match="verylongword"):
        PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, ["cat", long_name], n_ctx=4)
    # Fits without context, not with 16 context tokens: still refused.
    name = " ".join(["dog"] * 20)
    PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, [name], n_ctx=4)
    with pytest.raises(ConfigError, match="too long"):
        PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, [name], n_ctx=16)


def test_bad_arguments(tiny_teacher):
    with pytest.raises(ConfigError, match="class_token_position"):
        PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, class_token_position="back")
    with pytest.raises(ConfigError):
        PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, [], n_ctx=4)
    with pytest.raises(ConfigError):
        PromptLearner(tiny_teacher.model, tiny_teacher.tokenizer, NAMES, n_ctx=0)


class HFTextEncoder(nn.Module):  # same name as open_clip.hf_model.HFTextEncoder, no token-embedding interface
    def __init__(self):
        super().__init__()
        self.transformer = nn.Linear(4, 4)


class _HFModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.text = HFTextEncoder()


def test_unsupported_text_towers_raise_config_error(tiny_teacher):
    with pytest.raises(ConfigError, match="HFTextEncoder"):
        PromptLearner(_HFModel(), tiny_teacher.tokenizer, NAMES)
    with pytest.raises(ConfigError, match="text tower"):
        PromptLearner(nn.Linear(3, 3), tiny_teacher.tokenizer, NAMES)
    with pytest.raises(ConfigError):
        PromptLearner(object(), tiny_teacher.tokenizer, NAMES)
