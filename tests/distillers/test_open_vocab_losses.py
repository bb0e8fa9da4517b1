"""The CLIP distillation terms of method=openvocab (CLIP-KD's ICL, TinyCLIP's affinity mimicking / CRD): their values
in the distiller against loops, every sample of a batch training them, absent at weight 0, their gradients, what the
teacher is asked for, and the option rules."""

import pytest
import torch
import torch.nn.functional as F

import pand.distillers.open_vocab as open_vocab
from pand.config import compose, to_plain
from pand.distillers import Progress, TeacherContext, build_distiller, get_distiller_class
from pand.engine.config_checks import validate_train_config
from pand.errors import ConfigError
from pand.rules import check_rules
from pand.students import build_student
from tests.test_losses import affinity_by_hand, icl_by_hand

C, D, B = 4, 16, 6
OpenVocab = get_distiller_class("openvocab")


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def _context():
    return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=_unit(C, D, seed=0))


def _distiller(**options):
    torch.manual_seed(0)
    student = build_student("resnet18", C, pretrained=False, image_size=32)
    return build_distiller({"name": "openvocab", **options}, student, C, _context())


def _batch(unlabelled_labels=(-1, -1, -1)):
    """Samples 0, 2, 4 labelled, 1, 3, 5 not; the label field of the unlabelled ones holds ``unlabelled_labels``."""
    g = torch.Generator().manual_seed(1)
    labels = torch.tensor([0, 0, 1, 0, 2, 0])
    labels[1::2] = torch.tensor(unlabelled_labels)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "label": labels,
            "labelled": torch.tensor([True, False] * 3)}


TEACHER = {"image_embeds": _unit(B, D, seed=7)}
RELATIONAL = {"icl_weight": 0.5, "affinity_weight": 2.0, "relation_temperature": 0.1}


def test_relational_terms_match_loops_over_every_sample_of_the_batch():
    d = _distiller(**RELATIONAL).eval()
    batch = _batch()
    out = d.training_losses(batch, TEACHER, Progress(0, 1))
    with torch.no_grad():
        e = d.student.embed(batch["image"]).double()
    t, w = TEACHER["image_embeds"].double(), d.text_embeds.double()
    icl = icl_by_hand(e.tolist(), t.tolist(), 0.1)
    affinity = affinity_by_hand(e.tolist(), t.tolist(), w.tolist(), 0.1)
    assert out.losses["icl"].item() == pytest.approx(0.5 * icl, rel=1e-4)
    assert out.losses["affinity"].item() == pytest.approx(2.0 * affinity, rel=1e-4)
    # the unlabelled samples are in both terms: the labelled half alone gives other values
    labelled = batch["labelled"]
    assert icl != pytest.approx(icl_by_hand(e[labelled].tolist(), t[labelled].tolist(), 0.1), rel=1e-3)
    assert affinity != pytest.approx(
        affinity_by_hand(e[labelled].tolist(), t[labelled].tolist(), w.tolist(), 0.1), rel=1e-3)
    # the existing terms are unchanged by the new ones
    plain = _distiller().eval().training_losses(batch, TEACHER, Progress(0, 1))
    for term in ("distill", "align"):
        torch.testing.assert_close(out.losses[term], plain.losses[term])


def test_relational_terms_never_read_a_label():
    d = _distiller(**RELATIONAL).eval()
    outs = [d.training_losses(_batch(fake), TEACHER, Progress(0, 1)) for fake in ((-1, -1, -1), (3, 1, 2))]
    for term in ("icl", "affinity"):
        torch.testing.assert_close(outs[0].losses[term], outs[1].losses[term])
    # a batch without any label: they still train (the label-aware alignment is 0 there)
    batch = _batch()
    batch["label"][:], batch["labelled"][:] = -1, False
    out = d.training_losses(batch, TEACHER, Progress(0, 1))
    assert out.losses["align"].item() == 0.0
    assert out.losses["icl"].item() > 0 and out.losses["affinity"].item() > 0


def test_terms_at_weight_zero_are_absent_and_not_computed(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a term with weight 0 was computed")

    monkeypatch.setattr(open_vocab, "affinity_mimicking_loss", refuse)
    out = _distiller().training_losses(_batch(), TEACHER, Progress(0, 1))  # the defaults: ICL on, affinity off
    assert set(out.losses) == {"distill", "align", "icl"}
    monkeypatch.setattr(open_vocab, "interactive_contrastive_loss", refuse)
    out = _distiller(icl_weight=0.0).training_losses(_batch(), TEACHER, Progress(0, 1))  # KDEOV's two terms
    assert set(out.losses) == {"distill", "align"}
    monkeypatch.undo()
    out = _distiller(icl_weight=1.0, distill_weight=0.0).training_losses(_batch(), TEACHER, Progress(0, 1))
    assert set(out.losses) == {"align", "icl"}
    out = _distiller(affinity_weight=1.0, align_weight=0.0, icl_weight=0.0).training_losses(_batch(), TEACHER,
                                                                                       Progress(0, 1))
    assert set(out.losses) == {"distill", "affinity"}


@pytest.mark.parametrize("term", ["icl", "affinity"])
def test_each_relational_term_trains_the_student(term):
    d = _distiller(**{"distill_weight": 0.0, "align_weight": 0.0, "icl_weight": 0.0, f"{term}_weight": 1.0}).train()
    out = d.training_losses(_batch(), TEACHER, Progress(0, 1))
    assert set(out.losses) == {term}
    out.losses[term].backward()
    for module in (d.student.head, d.student.backbone):
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        assert any(g is not None and g.abs().sum() > 0 for g in grads), module.__class__.__name__
        assert all(torch.isfinite(g).all() for g in grads if g is not None)


def test_the_teacher_images_are_read_when_any_term_on_them_is_on():
    assert OpenVocab.requires_for({}) == {"image_embeds"}
    assert OpenVocab.requires_for({"distill_weight": 0.0}) == {"image_embeds"}  # ICL is on by default
    assert OpenVocab.requires_for({"distill_weight": 0.0, "icl_weight": 0.0}) == frozenset()
    assert OpenVocab.requires_for({"distill_weight": 0.0, "icl_weight": 0.3}) == {"image_embeds"}
    assert OpenVocab.requires_for({"distill_weight": 0.0, "icl_weight": 0.0, "affinity_weight": 0.3}) == {
        "image_embeds"}
    assert _distiller(distill_weight=0.0, affinity_weight=1.0).requires == {"image_embeds"}
    assert _distiller(distill_weight=0.0, icl_weight=0.0).requires == frozenset()


def test_nothing_to_learn_counts_the_relational_weights():
    off = {"distill_weight": 0.0, "align_weight": 0.0, "icl_weight": 0.0}
    assert any("nothing to learn" in e for e in OpenVocab.check_config({"method": off}))
    assert not any("nothing to learn" in e for e in  # ICL's default weight counts
                   OpenVocab.check_config({"method": {"distill_weight": 0.0, "align_weight": 0.0}}))
    for term in ("icl_weight", "affinity_weight"):
        assert not any("nothing to learn" in e for e in OpenVocab.check_config({"method": {**off, term: 0.1}}))
    errors = OpenVocab.check_config({"method": {**off, "icl_weight": 0.0, "affinity_weight": 0.0}})
    assert any("nothing to learn" in e and "method.icl_weight=0" in e and "method.affinity_weight=0" in e
               for e in errors)


def test_option_rules():
    good = {"icl_weight": 0.0, "affinity_weight": 1.5, "relation_temperature": 0.01}
    assert check_rules(good, OpenVocab.option_rules) == []
    bad = {"icl_weight": -0.1, "affinity_weight": -1.0, "relation_temperature": 0.0}
    errors = check_rules(bad, OpenVocab.option_rules)
    assert len(errors) == 3 and all(any(k in e for e in errors) for k in bad)
    assert len(check_rules({"relation_temperature": -0.07}, OpenVocab.option_rules)) == 1


def test_the_method_config_has_icl_on_affinity_off_and_refuses_bad_values():
    method = to_plain(compose("train", ["method=openvocab"]))["method"]
    assert (method["icl_weight"], method["affinity_weight"], method["relation_temperature"]) == (1.0, 0.0, 0.07)
    config = to_plain(compose("train", ["method=openvocab", "method.icl_weight=-1",
                                        "method.relation_temperature=0"]))
    with pytest.raises(ConfigError, match="relation_temperature"):
        validate_train_config(config)
