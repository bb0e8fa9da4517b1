"""The open-vocabulary student (KDEOV): losses against independent computations, heads, fusion, vocabulary swaps."""

import math

import pytest
import torch
import torch.nn.functional as F

from pand.distillers import (
    Progress,
    TeacherContext,
    build_distiller,
    get_distiller_class,
)
from pand.errors import ConfigError
from pand.losses import embedding_distill_loss, label_infonce_loss
from pand.students import build_student
from pand.students.open_vocab import OpenVocabStudent

C, D, B = 4, 16, 6


def _unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


@pytest.fixture
def context():
    return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=_unit(C, D, seed=0))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "label": torch.tensor([0, 1, 1, 2, 0, 1])}


def _student(name="resnet18"):
    torch.manual_seed(0)
    return build_student(name, C, pretrained=False, image_size=32)


# -- losses --------------------------------------------------------------------------------------------------------
def test_embedding_distillation_hand_computed():
    s = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    t = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    # cosines: 3/5 and 0 -> mean(1 - cos) = (0.4 + 1) / 2
    assert embedding_distill_loss(s, t, "cosine").item() == pytest.approx(0.7)
    # normalised: (0.6, 0.8) vs (1, 0): sq. errors 0.16 + 0.64; (1, 0) vs (0, 1): 1 + 1 -> mean over 4 entries
    assert embedding_distill_loss(s, t, "l2").item() == pytest.approx((0.16 + 0.64 + 2.0) / 4)
    with pytest.raises(ValueError, match="cosine"):
        embedding_distill_loss(s, t, "l1")


def _infonce_by_hand(sim, labels, tau, symmetric):
    b = len(sim)
    i2t = sum(-math.log(math.exp(sim[i][labels[i]] / tau) / sum(math.exp(v / tau) for v in sim[i])) for i in range(b)) / b
    if not symmetric:
        return i2t
    terms = []
    for c in sorted(set(labels)):
        denom = sum(math.exp(sim[i][c] / tau) for i in range(b))
        pos = [i for i in range(b) if labels[i] == c]
        terms.append(sum(-math.log(math.exp(sim[i][c] / tau) / denom) for i in pos) / len(pos))
    return 0.5 * (i2t + sum(terms) / len(terms))


@pytest.mark.parametrize("symmetric", [False, True])
def test_label_infonce_matches_a_loop_over_images_and_classes(symmetric):
    sim = (_unit(B, D, seed=3) @ _unit(C, D, seed=4).t()).double()
    labels = [0, 1, 1, 2, 0, 1]  # duplicates: same-class images are positives, never negatives
    got = label_infonce_loss(sim, torch.tensor(labels), 0.07, symmetric).item()
    assert got == pytest.approx(_infonce_by_hand(sim.tolist(), labels, 0.07, symmetric), rel=1e-5)


# -- the student ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,head", [("resnet18", "conv"), ("resnet18", "mlp"), ("pand_vit_p4_32", "conv")])
def test_student_embeds_in_teacher_space_and_classifies_by_its_vocabulary(name, head):
    vocab = _unit(C, D, seed=0)
    model = OpenVocabStudent(_student(name), D, head=head, vocabulary=vocab, input_size=(3, 32, 32)).eval()
    images = torch.randn(3, 3, 32, 32)
    e = model.embed(images)
    assert e.shape == (3, D) and torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    logits = model(images)
    torch.testing.assert_close(logits, (1 / 0.07) * e @ vocab.t(), rtol=1e-5, atol=1e-5)
    # Any list of names: a new text matrix, a new number of classes, no retraining.
    model.set_vocabulary(_unit(7, D, seed=9))
    assert model(images).shape == (3, 7)
    assert not hasattr(model, "linear_cls")  # no class-specific weights


def test_conv_head_reads_the_last_feature_map_not_the_pooled_feature():
    model = OpenVocabStudent(_student(), D, head="conv", vocabulary=_unit(C, D, seed=0), input_size=(3, 64, 64))
    assert model.stage == "layer4"
    assert model.visual_tokens(torch.randn(2, 3, 64, 64)).shape == (2, 4, 512)  # 2 x 2 map of ResNet-18 at 64 px
    mlp = OpenVocabStudent(_student(), D, head="mlp", vocabulary=_unit(C, D, seed=0), input_size=(3, 64, 64))
    assert mlp.visual_tokens(torch.randn(2, 3, 64, 64)).shape == (2, 1, 512)


def _perturb(module, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("fusion", ["film", "cross_attention"])
def test_each_fusion_starts_as_identity_and_then_changes_the_output(fusion):
    vocab = _unit(C, D, seed=0)
    tokens = torch.randn(C, 5, D, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True] * 3 + [False] * 2] * C)
    plain = OpenVocabStudent(_student(), D, vocabulary=vocab, input_size=(3, 32, 32)).eval()
    fused = OpenVocabStudent(_student(), D, fusion=fusion, vocabulary=vocab, input_size=(3, 32, 32)).eval()
    fused.set_vocabulary(vocab, tokens, mask)
    fused.load_state_dict(plain.state_dict(), strict=False)  # same backbone and head
    images = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(fused(images), plain(images), rtol=1e-5, atol=1e-5)  # zero-initialised: identity
    _perturb(fused.fusion)
    changed = fused(images)
    assert (changed - plain(images)).abs().max() > 1e-3
    if fusion == "film":
        # conditioned on the class text: another text matrix gives other per-class embeddings, not just a reorder
        fused.set_vocabulary(-vocab, tokens, mask)
        assert not torch.allclose(fused(images), -changed, atol=1e-4)
    else:
        # attends over the prompt's tokens: other token features change it, padded positions do not
        fused.set_vocabulary(vocab, tokens * 2, mask)
        assert (fused(images) - changed).abs().max() > 1e-4
        padded = tokens.clone()
        padded[:, 3:] = 100.0
        fused.set_vocabulary(vocab, padded, mask)
        torch.testing.assert_close(fused(images), changed, rtol=1e-5, atol=1e-5)


def test_fused_scores_are_chunked_without_changing_them(monkeypatch):
    import pand.students.open_vocab as ov

    model = OpenVocabStudent(_student(), D, fusion="film", vocabulary=_unit(C, D, seed=0), input_size=(3, 32, 32))
    _perturb(model.fusion)
    model.eval()
    images = torch.randn(3, 3, 32, 32)
    whole = model(images)
    monkeypatch.setattr(ov, "_PAIRS_PER_CHUNK", 3)  # one class per chunk
    torch.testing.assert_close(model(images), whole, rtol=1e-5, atol=1e-6)


# -- the distiller -------------------------------------------------------------------------------------------------
def test_openvocab_losses_match_an_independent_computation(context, batch):
    d = build_distiller({"name": "openvocab", "distill_weight": 2.0, "align_weight": 0.5}, _student(), C, context)
    d.eval()
    t_img = _unit(B, D, seed=7)
    out = d.training_losses(batch, {"image_embeds": t_img}, Progress(0, 1))
    with torch.no_grad():
        e = d.student.embed(batch["image"])
    sim = e @ context.text_embeds.t()
    assert out.losses["distill"].item() == pytest.approx(2.0 * (1 - (e * t_img).sum(-1)).mean().item(), rel=1e-5)
    expected = _infonce_by_hand(sim.double().tolist(), batch["label"].tolist(), 0.07, True)
    assert out.losses["align"].item() == pytest.approx(0.5 * expected, rel=1e-4)
    torch.testing.assert_close(out.logits, (1 / 0.07) * sim, rtol=1e-4, atol=1e-4)
    # The vocabulary (training classes' text matrix) is saved with the weights; the teacher is not.
    assert "student.vocabulary" in d.state_dict()


def test_openvocab_declares_what_it_reads():
    cls = get_distiller_class("openvocab")
    assert cls.requires_for({}) == {"image_embeds"}
    # only class text: no teacher pass per image
    assert cls.requires_for({"distill_weight": 0.0, "icl_weight": 0.0}) == frozenset()
    context = TeacherContext(embed_dim=D, logit_scale=10.0, text_embeds=_unit(C, D, seed=0))
    only_text = {"name": "openvocab", "distill_weight": 0.0, "icl_weight": 0.0}
    assert build_distiller(only_text, _student(), C, context).requires == frozenset()
    assert cls.reads_text_tokens({"fusion": "cross_attention"}) and not cls.reads_text_tokens({"fusion": "film"})
    assert cls.embeds_images


def test_openvocab_refuses_settings_it_cannot_honour():
    cls = get_distiller_class("openvocab")
    assert any("nothing to learn" in e for e in
               cls.check_config({"method": {"distill_weight": 0.0, "align_weight": 0.0, "icl_weight": 0.0}}))
    assert any("Mixup" in e for e in cls.check_config({"method": {}, "mixing": {"mixup_alpha": 0.2}}))
    assert any("text tower" in e for e in cls.check_config({"method": {}, "teacher": {"kind": "classifier"}}))
    with pytest.raises(ValueError, match="per-token"):
        build_distiller({"name": "openvocab", "fusion": "cross_attention"}, _student(),
                        C, TeacherContext(embed_dim=D, logit_scale=10.0, text_embeds=_unit(C, D, seed=0)))
    with pytest.raises(ConfigError, match="head"):
        OpenVocabStudent(_student(), D, head="attention")


def test_clip_teacher_token_features_are_the_projected_final_states(tiny_teacher):
    names, templates = ["cat", "sea otter"], ["a photo of a {}.", "{}"]
    tokens, mask = tiny_teacher.class_token_features(names, templates)
    assert tokens.shape[:2] == mask.shape and tokens.shape[0] == 2 and tokens.shape[2] == tiny_teacher.embed_dim
    # The pooled (end-of-text) token of the first template is encode_text's output before normalisation.
    ids = tiny_teacher.tokenizer([templates[0].format(n) for n in names])
    eot = ids.argmax(dim=-1)
    with torch.no_grad():
        reference = tiny_teacher.model.encode_text(ids)
    torch.testing.assert_close(tokens[torch.arange(2), eot], reference.float(), rtol=1e-4, atol=1e-5)
    assert int(mask[0].sum()) == int((ids[0] != 0).sum()) + int((tiny_teacher.tokenizer(["cat"])[0] != 0).sum())
