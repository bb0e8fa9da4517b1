
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from pand.distillers import Progress, TeacherContext, build_distiller
from pand.errors import ConfigError
from pand.losses import nlrd_loss
from pand.students import build_student

C, D, B = 4, 16, 6


def _context(with_prompts=True):
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(C, D, generator=g), dim=-1)
    prompts = F.normalize(torch.randn(C, D, generator=g), dim=-1) if with_prompts else None
    return TeacherContext(embed_dim=D, logit_scale=1 / 0.07, text_embeds=text, prompt_embeds=prompts)


def _student():
    torch.manual_seed(0)
    return build_student("resnet18", C, pretrained=False).eval()


def _batch(n=B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (
        {"image": torch.randn(n, 3, 32, 32, generator=g), "label": torch.arange(n) % C},
        {"image_embeds": F.normalize(torch.randn(n, D, generator=g), dim=-1)},
    )


def test_without_coop_and_nlrd_pand_is_vl2lite():
    batch, teacher = _batch()
    pand = build_distiller({"name": "pand", "use_coop": False, "use_nlrd": False}, _student(), C, _context())
    vl2lite = build_distiller({"name": "vl2lite"}, _student(), C, _context())
    vl2lite.load_state_dict(pand.state_dict())
    a = pand.training_losses(batch, teacher, Progress(3, 10)).losses
    b = vl2lite.training_losses(batch, teacher, Progress(3, 10)).losses
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].item() == pytest.approx(b[k].item(), rel=1e-6)


def test_coop_features_replace_the_template_features_everywhere():
    batch, teacher = _batch()
    ctx = _context()
    pand = build_distiller({"name": "pand", "use_coop": True, "use_nlrd": True, "nlrd": {"k": 2, "weight": 0.5}},
                           _student(), C, ctx)
    out = pand.training_losses(batch, teacher, Progress(0, 10))
    # NLRD's teacher logits are the zero-shot logits against the learned features
    z_t = ctx.logit_scale * teacher["image_embeds"] @ ctx.prompt_embeds.t()
    assert out.losses["nlrd"].item() == pytest.approx(0.5 * nlrd_loss(out.logits, z_t, 2).item(), rel=1e-5)
    # and so are linguistic KD's (the text condenser sees the learned features too)
    vl2lite_with_prompts = build_distiller({"name": "vl2lite", "linguistic_scale": 1.0}, _student(), C,
                                           TeacherContext(D, ctx.logit_scale, ctx.prompt_embeds))
    vl2lite_with_prompts.load_state_dict(pand.state_dict())
    ref = vl2lite_with_prompts.training_losses(batch, teacher, Progress(0, 10)).losses
    assert out.losses["linguistic_kd"].item() == pytest.approx(ref["linguistic_kd"].item(), rel=1e-5)


def test_linguistic_scale_follows_the_authors_per_variant_unless_set():
    assert build_distiller({"name": "pand"}, _student(), C, _context()).linguistic_scale == 1.0
    assert build_distiller({"name": "pand", "use_coop": False}, _student(), C, _context()).linguistic_scale == 0.5
    assert build_distiller({"name": "pand", "linguistic_scale": 0.25}, _student(), C, _context()).linguistic_scale == 0.25


def test_coop_without_learned_features_says_how_to_make_them():
    with pytest.raises(ConfigError, match="pand prompts"):
        build_distiller({"name": "pand"}, _student(), C, _context(with_prompts=False))
    with pytest.raises(ConfigError, match="nlrd has no option"):
        build_distiller({"name": "pand", "nlrd": {"kk": 3}}, _student(), C, _context())


def _ddp_worker(rank, world, init_file, results):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        batch, teacher = _batch(8, seed=7)
        local = slice(rank * 4, rank * 4 + 4)
        part = ({k: v[local] for k, v in batch.items()}, {k: v[local] for k, v in teacher.items()})
        for gather in ("all", "local"):
            pand = build_distiller({"name": "pand", "use_coop": False, "nlrd": {"k": 3, "gather": gather}},
                                   _student(), C, _context())
            loss = pand.training_losses(*part, Progress(0, 10)).losses["nlrd"]
            loss.backward()
            results[(gather, rank)] = loss.item()
    finally:
        dist.destroy_process_group()


def test_nlrd_gathers_neighbours_across_processes(tmp_path):
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), results), nprocs=2, join=True)
    batch, teacher = _batch(8, seed=7)
    pand = build_distiller({"name": "pand", "use_coop": False, "nlrd": {"k": 3}}, _student(), C, _context())
    full = pand.training_losses(batch, teacher, Progress(0, 10)).losses["nlrd"].item()
    # all-gather: the mean of the per-process losses is the loss over the whole global batch
    assert (results[("all", 0)] + results[("all", 1)]) / 2 == pytest.approx(full, rel=1e-5)
    # local (the authors' per-GPU choice): each process only sees its own 4 samples
    halves = [pand.training_losses({k: v[s] for k, v in batch.items()}, {k: v[s] for k, v in teacher.items()},
                                   Progress(0, 10)).losses["nlrd"].item() for s in (slice(0, 4), slice(4, 8))]
    assert results[("local", 0)] == pytest.approx(halves[0], rel=1e-5)
    assert results[("local", 1)] == pytest.approx(halves[1], rel=1e-5)
