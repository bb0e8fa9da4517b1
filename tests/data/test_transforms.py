"""Tests for pand.data.transforms (replayable augmentations, eval transform)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import PIL.Image
import pytest
import torch

from pand.data.image_ops import resized_hw
from pand.data.transforms import (
    CLIP_MEAN,
    CLIP_STD,
    AugmentConfig,
    ReplayableAugment,
    default_blur_kernel,
    denormalize,
    eval_transform,
    view_generator,
)

IDX = {name: i for i, name in enumerate(ReplayableAugment.PARAM_NAMES)}


def _rgb_image(h: int = 150, w: int = 200, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (h + w) * 255], axis=-1)
    noise = rng.integers(-20, 21, size=(h, w, 3))
    arr = np.clip(base + noise, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(arr, "RGB")


def _small_aug(**kw) -> ReplayableAugment:
    cfg = dict(image_size=64, resize_size=72)
    cfg.update(kw)
    return ReplayableAugment(AugmentConfig(**cfg))


# ----------------------------------------------------------------- determinism


def test_apply_is_deterministic_and_sample_reproducible():
    aug = ReplayableAugment(AugmentConfig())
    img = _rgb_image(300, 400)
    p1 = aug.sample(torch.Generator().manual_seed(123), (300, 400))
    p2 = aug.sample(torch.Generator().manual_seed(123), (300, 400))
    assert p1.dtype == torch.float32 and p1.shape == (aug.num_params,)
    assert torch.equal(p1, p2)
    a, b = aug.apply(img, p1), aug.apply(img, p1.clone())
    assert torch.equal(a, b)
    # params given in another dtype are rounded to float32 first -> same output.
    assert torch.equal(aug.apply(img, p1.double()), a)
    # __call__ == sample + apply.
    out, p3 = aug(img, torch.Generator().manual_seed(123))
    assert torch.equal(p3, p1) and torch.equal(out, a)
    # a different seed gives a different view.
    assert not torch.equal(aug.sample(torch.Generator().manual_seed(124), (300, 400)), p1)


def test_apply_does_not_touch_global_rng():
    aug = _small_aug()
    img = _rgb_image()
    torch.manual_seed(0)
    before = torch.get_rng_state()
    aug(img, view_generator(0, 0, 0))
    assert torch.equal(torch.get_rng_state(), before)


def test_view_generator():
    def draw(g):
        return torch.rand(8, generator=g)

    assert torch.equal(draw(view_generator(1, 2, 3)), draw(view_generator(1, 2, 3)))
    triples = [(1, 2, 3), (1, 2, 4), (1, 3, 3), (2, 2, 3), (1, 3, 2), (0, 0, 0), (0, 0, 1), (0, 1, 0)]
    draws = [draw(view_generator(*t)) for t in triples]
    for i in range(len(draws)):
        for j in range(i + 1, len(draws)):
            assert not torch.equal(draws[i], draws[j]), (triples[i], triples[j])
    assert view_generator(0, 0, 0).initial_seed() < 2**63


# ----------------------------------------------------------------- ranges


def test_param_ranges_over_many_draws():
    cfg = AugmentConfig()
    aug = ReplayableAugment(cfg)
    f32 = lambda v: float(torch.tensor(v, dtype=torch.float32))  # noqa: E731
    sizes = [(375, 500), (500, 375), (224, 224), (100, 30), (256, 256)]
    flips = []
    for k in range(600):
        hw = sizes[k % len(sizes)]
        rh, rw = resized_hw(hw, cfg.resize_size)
        p = aug.sample(view_generator(7, 0, k), hw)
        v = p.tolist()
        ints = [v[IDX[n]] for n in ("crop_top", "crop_left", "zoom_size", "zoom_top", "zoom_left", "flip")]
        ints += v[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1]
        assert all(x == int(x) for x in ints)
        assert 0 <= v[IDX["crop_top"]] <= rh - cfg.image_size
        assert 0 <= v[IDX["crop_left"]] <= rw - cfg.image_size
        s = v[IDX["zoom_size"]]
        assert math.ceil(cfg.min_crop_frac * cfg.image_size - 1e-9) <= s <= cfg.image_size
        assert 0 <= v[IDX["zoom_top"]] <= cfg.image_size - s
        assert 0 <= v[IDX["zoom_left"]] <= cfg.image_size - s
        assert -cfg.degrees <= v[IDX["angle"]] <= cfg.degrees
        assert f32(cfg.blur_sigma[0]) <= v[IDX["blur_sigma"]] <= f32(cfg.blur_sigma[1])
        for name in ("brightness", "contrast", "saturation"):
            fac = getattr(cfg, name)
            assert f32(max(0.0, 1 - fac)) <= v[IDX[name]] <= f32(1 + fac)
        assert -f32(cfg.hue) <= v[IDX["hue"]] <= f32(cfg.hue)
        order = v[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1]
        assert sorted(order) == [0, 1, 2, 3]
        assert v[IDX["flip"]] in (0.0, 1.0)
        flips.append(v[IDX["flip"]])
    # the draws actually vary and the flip rate is near flip_p
    assert 0.4 < np.mean(flips) < 0.6


def test_disabled_stages_give_identity_params():
    aug = ReplayableAugment(
        AugmentConfig(
            image_size=64,
            resize_size=64,
            min_crop_frac=1.0,
            degrees=0.0,
            blur=False,
            brightness=0.0,
            contrast=0.0,
            saturation=0.0,
            hue=0.0,
            flip_p=0.0,
        )
    )
    for k in range(20):
        v = aug.sample(view_generator(0, 0, k), (64, 64)).tolist()
        assert v[IDX["crop_top"]] == v[IDX["crop_left"]] == 0
        assert v[IDX["zoom_size"]] == 64 and v[IDX["zoom_top"]] == v[IDX["zoom_left"]] == 0
        assert v[IDX["angle"]] == 0 and v[IDX["blur_sigma"]] == 0
        assert v[IDX["brightness"]] == v[IDX["contrast"]] == v[IDX["saturation"]] == 1
        assert v[IDX["hue"]] == 0 and v[IDX["flip"]] == 0


# ----------------------------------------------------------------- identity vs eval


def test_identity_params_match_eval_transform_square():
    aug = _small_aug(resize_size=64)
    img = _rgb_image(100, 100)
    p = aug.identity_params((100, 100))
    out = aug.apply(img, p)
    ref = eval_transform(64)(img)
    assert out.shape == ref.shape == (3, 64, 64)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_identity_params_match_eval_transform_center_crop():
    aug = ReplayableAugment(AugmentConfig())  # 224 / 256
    img = _rgb_image(301, 457)
    out = aug.apply(img, aug.identity_params((301, 457)))
    ref = eval_transform(224, 256)(img)
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)


def test_eval_transform_deterministic_and_shapes():
    ev = eval_transform(32, 40)
    img = _rgb_image(50, 80)
    a, b = ev(img), ev(img)
    assert torch.equal(a, b) and a.shape == (3, 32, 32) and a.dtype == torch.float32
    g = denormalize(ev(img.convert("L")))
    assert g.shape == (3, 32, 32)
    assert torch.allclose(g[0], g[1], atol=1e-6) and torch.allclose(g[1], g[2], atol=1e-6)


# ----------------------------------------------------------------- geometry


def test_flip_param_flips():
    aug = _small_aug()
    img = _rgb_image()
    for k in range(4):
        p = aug.sample(view_generator(3, 1, k), (150, 200))
        p0, p1 = p.clone(), p.clone()
        p0[IDX["flip"]] = 0
        p1[IDX["flip"]] = 1
        assert torch.equal(aug.apply(img, p1), torch.flip(aug.apply(img, p0), dims=[-1]))


def test_rotation_changes_output_and_fills_corners():
    aug = _small_aug(resize_size=64)
    img = PIL.Image.new("RGB", (64, 64), (200, 100, 50))
    p = aug.identity_params((64, 64))
    base = aug.apply(img, p)
    p[IDX["angle"]] = 45.0
    rot = aug.apply(img, p)
    assert not torch.equal(rot, base)
    # corners are rotated out of the image -> zero fill, centre keeps the colour
    zero = denormalize(rot)[:, 0, 0]
    assert torch.allclose(zero, torch.zeros(3), atol=1e-6)
    assert torch.allclose(rot[:, 32, 32], base[:, 32, 32])
    # 90 degrees on a square image is an exact counter-clockwise rotation
    img2 = _rgb_image(64, 64)
    p90 = aug.identity_params((64, 64))
    p90[IDX["angle"]] = 90.0
    assert torch.equal(aug.apply(img2, p90), torch.rot90(aug.apply(img2, aug.identity_params((64, 64))), 1, (-2, -1)))


def _gradient_image(h: int, w: int) -> PIL.Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([xx, yy, np.zeros_like(xx)], axis=-1).astype(np.uint8)
    return PIL.Image.fromarray(arr, "RGB")


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return denormalize(x) * 255.0


def test_crop_params_select_expected_region():
    # resize_size == short side -> no resize; R channel = column, G channel = row.
    aug = _small_aug(resize_size=96)
    img = _gradient_image(96, 128)
    p = aug.identity_params((96, 128))
    p[IDX["crop_top"]], p[IDX["crop_left"]] = 17, 40
    px = _pixels(aug.apply(img, p))
    cols = torch.arange(64, dtype=torch.float32)
    assert torch.allclose(px[0], (40 + cols).expand(64, 64), atol=1e-3)
    assert torch.allclose(px[1], (17 + cols).unsqueeze(1).expand(64, 64), atol=1e-3)

    # zoom crop of side 48 at (5, 9) inside it, resized 48 -> 64 (bilinear):
    # output pixel j samples source coordinate (j + 0.5) * 48 / 64 - 0.5.
    p[IDX["zoom_size"]], p[IDX["zoom_top"]], p[IDX["zoom_left"]] = 48, 5, 9
    px = _pixels(aug.apply(img, p))
    src = (cols + 0.5) * 48 / 64 - 0.5
    inner = slice(2, 62)
    exp_r = 40 + 9 + src
    exp_g = 17 + 5 + src
    assert torch.allclose(px[0][:, inner], exp_r[inner].expand(64, -1), atol=1.01)
    assert torch.allclose(px[1][inner, :], exp_g[inner].unsqueeze(1).expand(-1, 64), atol=1.01)
    assert px[0].min() >= 49 - 1e-3 and px[0].max() <= 49 + 47 + 1e-3
    assert px[1].min() >= 22 - 1e-3 and px[1].max() <= 22 + 47 + 1e-3


def test_params_for_other_image_rejected():
    aug = ReplayableAugment(AugmentConfig())
    p = aug.sample(torch.Generator().manual_seed(0), (256, 1000))
    p[IDX["crop_left"]] = 500
    with pytest.raises(ValueError):
        aug.apply(_rgb_image(256, 256), p)
    with pytest.raises(ValueError):
        aug.apply(_rgb_image(256, 256), p[:-1])


# ----------------------------------------------------------------- photometric


def test_blur_and_jitter_change_output():
    aug = _small_aug()
    img = _rgb_image()
    ident = aug.identity_params((150, 200))
    base = aug.apply(img, ident)
    for name, val in (("blur_sigma", 1.5), ("brightness", 1.3), ("contrast", 0.7), ("saturation", 1.4), ("hue", 0.1)):
        p = ident.clone()
        p[IDX[name]] = val
        assert not torch.allclose(aug.apply(img, p), base), name


def test_jitter_order_matters():
    aug = _small_aug()
    img = _rgb_image()
    p = aug.identity_params((150, 200))
    p[IDX["brightness"]], p[IDX["contrast"]], p[IDX["hue"]] = 1.4, 0.6, 0.2
    p[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    a = aug.apply(img, p)
    p[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1] = torch.tensor([3.0, 1.0, 2.0, 0.0])
    b = aug.apply(img, p)
    assert not torch.equal(a, b)
    p[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1] = torch.tensor([3.0, 1.0, 1.0, 0.0])
    with pytest.raises(ValueError):
        aug.apply(img, p)


def test_default_blur_kernel():
    assert default_blur_kernel(224) == 23
    assert default_blur_kernel(32) == 3 and default_blur_kernel(10) == 3
    assert all(default_blur_kernel(n) % 2 == 1 for n in range(1, 400))
    assert ReplayableAugment(AugmentConfig()).blur_kernel == 23
    assert ReplayableAugment(AugmentConfig(blur_kernel=9)).blur_kernel == 9


# ----------------------------------------------------------------- describe


def test_describe_is_json_and_sensitive_to_every_field():
    base = AugmentConfig()
    d0 = ReplayableAugment(base).describe()
    json.dumps(d0)
    assert d0["class"] == "ReplayableAugment" and isinstance(d0["version"], str)
    assert d0["param_names"] == list(ReplayableAugment.PARAM_NAMES)
    assert ReplayableAugment(AugmentConfig()).describe() == d0
    changed = dict(
        image_size=192,
        resize_size=300,
        min_crop_frac=0.5,
        degrees=10.0,
        blur=False,
        blur_sigma=(0.2, 2.0),
        blur_kernel=5,
        brightness=0.3,
        contrast=0.2,
        saturation=0.1,
        hue=0.05,
        flip_p=0.0,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    assert set(changed) == {f.name for f in dataclasses.fields(AugmentConfig)}
    for name, value in changed.items():
        d = ReplayableAugment(dataclasses.replace(base, **{name: value})).describe()
        json.dumps(d)
        assert d != d0, name
        assert json.loads(json.dumps(d)) == d


def test_config_validation_and_list_coercion():
    cfg = AugmentConfig(blur_sigma=[0.1, 2.0], mean=list(CLIP_MEAN), std=list(CLIP_STD))
    assert cfg == AugmentConfig() and hash(cfg) == hash(AugmentConfig())
    for bad in (
        dict(image_size=300),  # resize_size 256 < image_size
        dict(min_crop_frac=0.0),
        dict(blur_sigma=(2.0, 0.1)),
        dict(blur_kernel=4),
        dict(hue=0.6),
        dict(flip_p=1.5),
        dict(brightness=-0.1),
    ):
        with pytest.raises(ValueError):
            AugmentConfig(**bad)


# ----------------------------------------------------------------- output format


@pytest.mark.parametrize("hw", [(150, 200), (20, 13), (64, 64)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_output_shape_dtype_for_modes_and_small_images(hw, mode):
    aug = _small_aug()
    img = _rgb_image(*hw).convert(mode)
    out, p = aug(img, view_generator(0, 0, 1))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert torch.equal(aug.apply(img, p), out)


def test_grey_image_gives_equal_channels_before_normalisation():
    aug = _small_aug(hue=0.0, saturation=0.0)
    img = _rgb_image().convert("L")
    out, _ = aug(img, view_generator(0, 0, 5))
    px = denormalize(out)
    assert torch.allclose(px[0], px[1], atol=1e-5) and torch.allclose(px[1], px[2], atol=1e-5)


def test_normalisation_and_denormalize_roundtrip():
    aug = _small_aug(resize_size=64)
    img = PIL.Image.new("RGB", (64, 64), (10, 128, 250))
    out = aug.apply(img, aug.identity_params((64, 64)))
    expected = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(out[:, 5, 7], expected, atol=1e-6)
    assert torch.allclose(denormalize(out, CLIP_MEAN, CLIP_STD)[:, 5, 7], torch.tensor([10, 128, 250]) / 255.0, atol=1e-6)
    # random augmented views: denormalised values lie in [0, 1]; batch form works too
    views = torch.stack([aug(_rgb_image(), view_generator(1, 0, k))[0] for k in range(3)])
    d = denormalize(views, CLIP_MEAN, CLIP_STD)
    assert d.shape == (3, 3, 64, 64)
    assert d.min() >= -1e-5 and d.max() <= 1 + 1e-5
    for k in range(3):
        assert torch.equal(d[k], denormalize(views[k], CLIP_MEAN, CLIP_STD))
    # round trip: normalise(denormalise(x)) == x
    m = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    s = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose((d - m) / s, views, atol=1e-5)


def test_uint8_tensor_input_matches_pil():
    aug = _small_aug()
    img = _rgb_image()
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous()
    p = aug.sample(view_generator(2, 0, 0), (150, 200))
    assert torch.equal(aug.apply(t, p), aug.apply(img, p))
    out, p2 = aug(t, view_generator(2, 0, 0))
    assert torch.equal(p2, p)


def test_single_channel_tensor_input_matches_grey_pil():
    aug = _small_aug()
    grey = _rgb_image().convert("L")
    t = torch.from_numpy(np.array(grey)).unsqueeze(0)
    p = aug.sample(view_generator(4, 0, 0), (150, 200))
    assert torch.equal(aug.apply(t, p), aug.apply(grey, p))


def test_output_independent_of_thread_count():
    # teacher-cache views may be rebuilt in DataLoader workers with 1 thread
    aug = ReplayableAugment(AugmentConfig())
    img = _rgb_image(300, 400)
    p = aug.sample(view_generator(9, 0, 0), (300, 400))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = aug.apply(img, p)
        torch.set_num_threads(max(2, n))
        b = aug.apply(img, p)
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)
