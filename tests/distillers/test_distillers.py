import math

import pytest
import torch
import torch.nn.functional as F

from pand.distillers import Progress, TeacherContext, build_distiller, list_distillers
from pand.errors import ConfigError
from pand.students import build_student

C, D, B = 4, 16, 6


@pytest.fixture
def context():
    g = torch.Generator().manual_seed(0)
    return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=F.normalize(torch.randn(C, D, generator=g), dim=-1))


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return {"image": torch.randn(B, 3, 32, 32, generator=g), "label": torch.arange(B) % C}


@pytest.fixture
def teacher_out():
    g = torch.Generator().manual_seed(2)
    return {"image_embeds": F.normalize(torch.randn(B, D, generator=g), dim=-1)}


def student():
    torch.manual_seed(0)
    return build_student("resnet18", C, pretrained=False).eval()  # eval: BN uses running stats, deterministic


def test_registry_lists_builtins_and_refuses_unknowns(context):
    assert {"ce", "kd", "vl2lite"} <= set(list_distillers())
    with pytest.raises(ConfigError, match="unknown method 'nope'"):
        build_distiller({"name": "nope"}, student(), C, context)
    with pytest.raises(ConfigError, match="no option"):
        build_distiller({"name": "vl2lite", "temprature": 2.0}, student(), C, context)


def test_methods_that_need_the_teacher_refuse_to_build_without_it():
    with pytest.raises(ConfigError, match="text embeddings"):
        build_distiller({"name": "vl2lite"}, student(), C, None)


def test_vl2lite_matches_an_independent_computation(context, batch, teacher_out):
    d = build_distiller({"name": "vl2lite", "temperature": 2.0, "linguistic_scale": 0.5}, student(), C, context)
    d.eval()
    epoch, max_epochs = 30, 60
    out = d.training_losses(batch, teacher_out, Progress(epoch, max_epochs))

    # Recompute from the formulas with plain tensor ops and the same weights.
    s, T = 1 / 0.07, 2.0
    with torch.no_grad():
        h = d.student.backbone(batch["image"])
        logits = h @ d.student.linear_cls.weight.t() + d.student.linear_cls.bias

        def mlp(m, x):
            return F.relu(x @ m[0].weight.t() + m[0].bias) @ m[2].weight.t() + m[2].bias

        t_img, t_txt = teacher_out["image_embeds"], context.text_embeds
        a_img = mlp(d.image_condenser, t_img)
        a_img = a_img / a_img.norm(dim=1, keepdim=True)
        a_txt = mlp(d.text_condenser, t_txt)
        a_txt = a_txt / a_txt.norm(dim=1, keepdim=True)
        hn = h / h.norm(dim=1, keepdim=True)
        l_img = (hn - a_img).abs().sum() / (B * h.shape[1])
        z_s, z_t = s * hn @ a_txt.t(), s * t_img @ t_txt.t()
        p_t = torch.softmax(z_t / T, 1)
        kl = (p_t * (torch.log(p_t) - torch.log_softmax(z_s / T, 1))).sum() / B
        l_kd = T * T / 2 * kl
        l_ce = -torch.log_softmax(logits, 1)[torch.arange(B), batch["label"]].mean()
        w_cls = epoch / (8 * max_epochs)
        total = w_cls * l_ce + ((1 - w_cls) * l_img + (1 - w_cls) * l_kd) / 2

    got = sum(out.losses.values())
    assert got.item() == pytest.approx(total.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(w_cls * l_ce.item(), rel=1e-5)
    assert out.logs["w_cls"] == pytest.approx(w_cls)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-5)


def test_vl2lite_gradients_reach_student_and_condensers(context, batch, teacher_out):
    d = build_distiller({"name": "vl2lite"}, student(), C, context)
    d.train()
    out = d.training_losses(batch, teacher_out, Progress(1, 10))
    sum(out.losses.values()).backward()
    for module in (d.student.backbone, d.student.linear_cls, d.image_condenser, d.text_condenser):
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert not d.text_embeds.requires_grad


def test_vl2lite_state_dict_has_no_teacher_derived_tensors(context):
    d = build_distiller({"name": "vl2lite"}, student(), C, context)
    assert not any("text_embeds" in k for k in d.state_dict())


def test_kd_is_ce_plus_hinton_kd_on_the_teachers_logits(context, batch, teacher_out):
    d = build_distiller({"name": "kd", "temperature": 4.0, "kd_weight": 0.5}, student(), C, context)
    z_t = (1 / 0.07) * teacher_out["image_embeds"] @ context.text_embeds.t()  # a CLIP teacher's zero-shot logits
    out = d.training_losses(batch, {"logits": z_t}, Progress(0, 1))
    T = 4.0
    expected_kd = 0.5 * T * T * F.kl_div(F.log_softmax(out.logits / T, 1), F.softmax(z_t / T, 1), reduction="batchmean")
    assert out.losses["kd"].item() == pytest.approx(expected_kd.item(), rel=1e-5)
    assert out.losses["ce"].item() == pytest.approx(F.cross_entropy(out.logits, batch["label"]).item(), rel=1e-5)


def test_ce_needs_no_teacher(batch):
    d = build_distiller({"name": "ce"}, student(), C, None)
    assert not d.uses_teacher
    out = d.training_losses(batch, {}, Progress(0, 1))
    assert set(out.losses) == {"ce"}
    assert math.isfinite(out.losses["ce"].item())
