"""method.caption_weight of method=openvocab: the symmetric image-caption InfoNCE against the teacher's embeddings of
each sample's caption, its value in the distiller against the loss computed on the same embeddings, which samples
train it, what the teacher side hands it (the teacher's caption embeddings, once per run), and its refusals."""

import pytest
import torch
import torch.nn.functional as F

from pand.config import compose, to_plain
from pand.distillers import Progress, TeacherContext, build_distiller, get_distiller_class
from pand.engine.data import PandDataModule
from pand.engine.run import build_student_from
from pand.engine.teacher_side import build_teacher_side
from pand.errors import ConfigError
from pand.losses import caption_infonce_loss
from pand.students import build_student
from pand.teachers.registry import load_teacher
from tests.data.test_captions import make_pairs
from tests.engine.conftest import tiny_overrides

C, D, B, M = 3, 16, 6, 5
OpenVocab = get_distiller_class("openvocab")


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _context(**fields):
    return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=_unit(C, D, seed=0),
                          caption_embeds=_unit(M, D, seed=1).half(), **fields)


def _distiller(context=None, **options):
    torch.manual_seed(0)
    student = build_student("resnet18", C, pretrained=False, image_size=32)
    # KDEOV's two terms unless a test says otherwise, so that each test sees only the terms it is about
    return build_distiller({"name": "openvocab", "icl_weight": 0.0, **options}, student, C, context or _context())


def _batch(captions=(0, 3, 3, -1, 1, 4)):
    g = torch.Generator().manual_seed(2)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "label": torch.full((B,), -1),
            "labelled": torch.zeros(B, dtype=torch.bool), "caption": torch.tensor(captions)}


TEACHER = {"image_embeds": _unit(B, D, seed=7)}


def test_the_caption_term_is_the_image_caption_infonce_of_the_captioned_samples():
    d = _distiller(caption_weight=0.5, temperature=0.1).eval()
    batch = _batch()
    out = d.training_losses(batch, TEACHER, Progress(0, 1))
    with torch.no_grad():
        e = d.student.embed(batch["image"])
    rows = torch.tensor([0, 3, 3, 1, 4])  # sample 3 has no caption (-1); samples 1 and 2 share row 3
    keep = torch.tensor([0, 1, 2, 4, 5])
    texts = _unit(M, D, seed=1).half()[rows]
    expected = caption_infonce_loss(e[keep], texts, rows, 0.1)
    assert out.losses["caption"].item() == pytest.approx(0.5 * expected.item(), rel=1e-5)
    assert set(out.losses) == {"distill", "align", "caption"}


def test_the_caption_term_trains_the_student_and_gives_zero_without_a_captioned_sample():
    d = _distiller(caption_weight=1.0, distill_weight=0.0, align_weight=0.0).train()
    out = d.training_losses(_batch(), TEACHER, Progress(0, 1))
    assert set(out.losses) == {"caption"}
    out.losses["caption"].backward()
    grads = [p.grad for p in d.student.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    none = d.training_losses(_batch((-1,) * B), TEACHER, Progress(0, 1)).losses["caption"]
    assert none.item() == 0.0 and none.requires_grad


def test_off_by_default_read_only_when_on_and_never_saved():
    assert "caption" not in _distiller().training_losses(_batch(), TEACHER, Progress(0, 1)).losses
    assert not OpenVocab.reads_captions({}) and OpenVocab.reads_captions({"caption_weight": 0.2})
    d = _distiller(caption_weight=1.0)
    assert "caption_embeds" not in d.state_dict() and d.caption_embeds.dtype == torch.float16
    off = {"distill_weight": 0.0, "align_weight": 0.0, "icl_weight": 0.0}
    assert any("nothing to learn" in e and "method.caption_weight=0" in e for e in OpenVocab.check_config(
        {"method": off}))
    assert not any("nothing to learn" in e for e in OpenVocab.check_config({"method": {**off, "caption_weight": 1}}))
    assert OpenVocab.option_rules["caption_weight"].problem(-1.0)


def test_the_term_is_refused_without_captions_and_affinity_without_a_training_vocabulary():
    bare = TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=_unit(C, D, seed=0))
    with pytest.raises(ConfigError, match=r"caption_weight > 0 needs the teacher's embeddings .*data=captions"):
        _distiller(bare, caption_weight=1.0)
    with pytest.raises(ConfigError, match="only \"classes\" of a captions run are its val captions"):
        _distiller(_context(vocabulary_for_selection_only=True), affinity_weight=1.0)
    _distiller(_context(vocabulary_for_selection_only=True), icl_weight=1.0, caption_weight=1.0)


def _config(root, run, *extra):
    return to_plain(compose("train", [
        "data=captions", f"data.root={root}", "data.val_fraction=0.2", "data.image_size=32", "data.resize_size=36",
        "data.batch_size=4", "data.num_workers=0", "data.verify_images=false", "teacher=tiny",
        "student.pretrained=false", "trainer=cpu", f"run_dir={run}", "method=openvocab", *extra]))


def test_the_teacher_side_embeds_every_training_caption_once_and_batches_say_which_each_sample_uses(tmp_path):
    root = make_pairs(tmp_path / "pairs")
    config = _config(root, tmp_path / "run", "method.caption_weight=1.0")
    data = PandDataModule(config["data"], seed=3)
    context, _ = build_teacher_side(config, data, OpenVocab)
    table = data.caption_table
    assert len(table.ids) == len(data.train_pool) == 8 and len(table.texts) == sum(map(len, table.ids))
    teacher = load_teacher(config)
    assert torch.equal(context.caption_embeds, teacher.caption_embeddings(list(table.texts)).half())
    # the run's classes are its val captions, for model selection only
    assert context.vocabulary_for_selection_only and context.text_embeds.shape[0] == len(data.classes) == 2
    data.setup()
    loader = data.train_dataloader()
    views = loader.dataset
    for epoch in (0, 1):
        loader.sampler.set_epoch(epoch)
        for batch in loader:
            for index, row in zip(batch["index"].tolist(), batch["caption"].tolist()):
                assert row == table.choose(3, epoch, index) and row in table.ids[index]
                assert views[(index, epoch)]["caption"] == row


def test_a_classifier_method_or_captions_without_captioned_images_are_refused(tmp_path, cub_root):
    root = make_pairs(tmp_path / "pairs")
    config = _config(root, tmp_path / "run", "method=kd")
    with pytest.raises(ConfigError, match=r"data=captions holds image-caption pairs without classes.*method 'kd'"):
        build_teacher_side(config, PandDataModule(config["data"]), get_distiller_class("kd"))
    config = to_plain(compose("train", tiny_overrides(cub_root, tmp_path / "run2", "method=openvocab",
                                                      "method.caption_weight=1.0")))
    with pytest.raises(ConfigError, match=r"training images of data=cub have none; use a captions dataset"):
        build_teacher_side(config, PandDataModule(config["data"]), OpenVocab)


def test_a_captioned_unlabelled_pool_beside_a_classification_dataset_trains_the_term_on_its_images(tmp_path,
                                                                                                   cub_root):
    pool = make_pairs(tmp_path / "pairs")
    config = to_plain(compose("train", tiny_overrides(
        cub_root, tmp_path / "run", "method=openvocab", "method.caption_weight=1.0", "method.affinity_weight=0.5",
        "data.samples_per_class=2", f"data.unlabelled=captions:{pool}", "data.labelled_fraction=0.5",
        "data.verify_images=false")))
    data = PandDataModule(config["data"], seed=0)
    context, source = build_teacher_side(config, data, OpenVocab)
    assert not context.vocabulary_for_selection_only  # the classes are cub's: the affinity term may use them
    table = data.caption_table
    n_labelled = len(data.splits["train"])
    assert table.ids[:n_labelled] == ((),) * n_labelled and all(table.ids[n_labelled:])
    assert context.caption_embeds.shape[0] == len(table.texts)
    data.setup()
    batch = next(iter(data.train_dataloader()))
    labelled = batch["labelled"]
    assert labelled.any() and (batch["caption"][labelled] == -1).all() and (batch["caption"][~labelled] >= 0).all()
    distiller = build_distiller(config["method"], build_student_from(config, data.num_classes), data.num_classes, context)
    out = distiller.training_losses(batch, source(batch, distiller.requires), Progress(0, 1))
    assert {"caption", "affinity", "align", "distill"} <= set(out.losses)
    assert torch.isfinite(out.losses["caption"]) and out.losses["caption"].item() > 0
