"""The batched (device) replay of the training augmentation against the per-image CPU path.

Tolerance, stated once: the zoom resize is bit-identical (integer arithmetic of torch's uint8 kernel); every other
value of a view agrees with ``ReplayableAugment.apply`` to ``ATOL`` (float32 rounding of batched sums, measured
max 4.5e-6 on normalised values over 64 photo-sized views at 224 px); a nearest-neighbour rotation may pick the
neighbouring pixel for a sample within ~1e-5 px of a half-pixel boundary, so up to ``MAX_FLIPPED`` of the values may
differ by more (none did in these tests). A teacher's embeddings of the two views agree within float16 storage
precision, which is what keeps a teacher cache valid across ``data.augment_on``.
"""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from pand.data.device_augment import BatchedAugment, _zoom, crop_window
from pand.data.transforms import AugmentConfig, ReplayableAugment, view_generator

ATOL = 1e-4
MAX_FLIPPED = 1e-4  # share of values allowed beyond ATOL (rotation boundary samples)
IDX = {name: i for i, name in enumerate(ReplayableAugment.PARAM_NAMES)}


def _photo(h: int, w: int, seed: int) -> PIL.Image.Image:
    """Smooth colour fields plus noise: a photo's mix of flat regions and edges."""
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (h // 12 + 2, w // 12 + 2, 3), dtype=np.uint8)
    img = PIL.Image.fromarray(low, "RGB").resize((w, h), PIL.Image.BILINEAR)
    arr = np.asarray(img, dtype=np.int16) + rng.integers(-12, 13, (h, w, 3), dtype=np.int16)
    return PIL.Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _both(augment: ReplayableAugment, images, params):
    cpu = torch.stack([augment.apply(im, p) for im, p in zip(images, params)])
    windows = torch.stack([crop_window(augment, im, p) for im, p in zip(images, params)])
    return cpu, BatchedAugment(augment)(windows, torch.stack(params))


def _assert_close(cpu: torch.Tensor, batched: torch.Tensor) -> None:
    assert batched.shape == cpu.shape and batched.dtype == torch.float32
    diff = (batched - cpu).abs()
    flipped = float((diff > ATOL).float().mean())
    assert flipped <= MAX_FLIPPED, f"{flipped:.2e} of the values differ by more than {ATOL} (max {diff.max():.3g})"


@pytest.mark.parametrize(("channels_last", "dtype"), [(True, torch.float32), (False, torch.float32),
                                                     (True, torch.float64)])  # float64: the sums on CUDA
def test_zoom_resize_is_bit_identical_to_torch_uint8_kernel(channels_last, dtype):
    torch.manual_seed(0)
    size = 224
    for s in [192, 193, 200, 207, 211, 223, 224, 100, 31]:
        x = torch.randint(0, 256, (s, s, 3), dtype=torch.uint8).permute(2, 0, 1)
        if not channels_last:
            x = x.contiguous()
        expected = TF.resize(x, [size, size], interpolation=InterpolationMode.BILINEAR, antialias=True) if s != size \
            else x
        window = torch.zeros(1, 3, size, size, dtype=torch.uint8)
        window[0, :, :s, :s] = x
        got = _zoom(window, torch.tensor([s]), size, dtype)[0]
        assert torch.equal(got.to(torch.uint8), expected), s


def test_views_match_the_cpu_path_at_224px():
    augment = ReplayableAugment(AugmentConfig())
    images = [_photo(180 + 17 * i, 240 + 9 * i, i) for i in range(6)]
    params = [augment.sample(view_generator(3, 1, i), (im.height, im.width)) for i, im in enumerate(images)]
    _assert_close(*_both(augment, images, params))


def test_every_stage_alone_and_edge_params():
    """Each operation on its own (the others at identity), the identity view, and extreme values."""
    config = AugmentConfig(image_size=48, resize_size=56, min_crop_frac=0.5)
    augment = ReplayableAugment(config)
    image = _photo(70, 90, 7)
    base = augment.identity_params((image.height, image.width))
    variants = [base.clone()]
    for name, value in [("angle", 37.5), ("angle", -60.0), ("angle", 180.0), ("angle", 90.0), ("blur_sigma", 0.1),
                        ("blur_sigma", 2.0), ("brightness", 1.4), ("brightness", 0.0), ("contrast", 0.6),
                        ("saturation", 1.4), ("saturation", 0.0), ("hue", 0.1), ("hue", -0.5), ("flip", 1.0)]:
        p = base.clone()
        p[IDX[name]] = value
        variants.append(p)
    zoomed = base.clone()
    zoomed[IDX["zoom_size"]], zoomed[IDX["zoom_top"]], zoomed[IDX["zoom_left"]] = 24, 24, 3
    variants.append(zoomed)
    every = base.clone()  # everything at once, jitter in reversed order
    for name, value in [("angle", -12.25), ("blur_sigma", 1.3), ("brightness", 1.2), ("contrast", 0.7),
                        ("saturation", 1.3), ("hue", 0.07), ("flip", 1.0)]:
        every[IDX[name]] = value
    every[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    variants.append(every)
    _assert_close(*_both(augment, [image] * len(variants), variants))


def test_random_views_of_small_images_and_every_jitter_order():
    config = AugmentConfig(image_size=40, resize_size=44, degrees=180.0, blur_kernel=7)
    augment = ReplayableAugment(config)
    images = [_photo(44 + i, 60 - i, i) for i in range(24)]
    params = [augment.sample(view_generator(0, e, i), (im.height, im.width)) for i, im in enumerate(images)
              for e in range(3)]
    orders = {tuple(p[IDX["jitter_order_0"] : IDX["jitter_order_3"] + 1].tolist()) for p in params}
    assert len(orders) > 12  # many orders exercised
    _assert_close(*_both(augment, [im for im in images for _ in range(3)], params))


def test_uint8_tensor_and_grayscale_inputs_give_the_same_windows():
    augment = ReplayableAugment(AugmentConfig(image_size=32, resize_size=36))
    image = _photo(40, 50, 1)
    p = augment.sample(view_generator(0, 0, 0), (40, 50))
    as_tensor = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    assert torch.equal(crop_window(augment, image, p), crop_window(augment, as_tensor, p))
    gray = image.convert("L")
    _assert_close(*_both(augment, [gray], [p]))


def test_params_for_another_image_are_refused_like_the_cpu_path():
    augment = ReplayableAugment(AugmentConfig(image_size=32, resize_size=36))
    p = augment.sample(view_generator(0, 0, 0), (36, 400))  # a wide image: a large left offset
    p[IDX["crop_left"]] = 300
    with pytest.raises(ValueError, match="do not fit"):
        augment.apply(_photo(40, 50, 0), p)
    with pytest.raises(ValueError, match="do not fit"):
        crop_window(augment, _photo(40, 50, 0), p)


def test_batched_augment_checks_its_inputs():
    batched = BatchedAugment(AugmentConfig(image_size=32, resize_size=36))
    params = torch.zeros(2, len(ReplayableAugment.PARAM_NAMES))
    with pytest.raises(ValueError, match="uint8"):
        batched(torch.zeros(2, 3, 32, 32), params)
    with pytest.raises(ValueError, match="params must be"):
        batched(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), params[:1])


def test_teacher_embeddings_of_both_paths_agree_within_float16_storage(tiny_teacher):
    """What a teacher cache stores (float16 embeddings of CPU views) is what the device views give."""
    size = tiny_teacher.image_size
    augment = ReplayableAugment(AugmentConfig(image_size=size, resize_size=size + size // 8))
    images = [_photo(size + 20 + 3 * i, size + 40, 40 + i) for i in range(16)]
    params = [augment.sample(view_generator(1, 0, i), (im.height, im.width)) for i, im in enumerate(images)]
    cpu, batched = _both(augment, images, params)
    mean, std = augment.config.mean, augment.config.std
    with torch.no_grad():
        e_cpu = tiny_teacher.encode_images(tiny_teacher.prepare_images(cpu, mean, std))
        e_dev = tiny_teacher.encode_images(tiny_teacher.prepare_images(batched, mean, std))
    stored = e_cpu.half().float()
    # the device views' embeddings are closer to the fp32 embeddings than the cache's own float16 rounding is
    assert (e_dev - e_cpu).abs().max() <= (stored - e_cpu).abs().max()


def test_a_surrounding_autocast_does_not_lower_the_views():
    augment = ReplayableAugment(AugmentConfig(image_size=32, resize_size=36, min_crop_frac=0.6))
    images = [_photo(40, 50, i) for i in range(4)]
    params = torch.stack([augment.sample(view_generator(0, 0, i), (40, 50)) for i in range(4)])
    windows = torch.stack([crop_window(augment, im, p) for im, p in zip(images, params)])
    plain = BatchedAugment(augment)(windows, params)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = BatchedAugment(augment)(windows, params)
    assert under.dtype == torch.float32 and torch.equal(under, plain)


def test_the_accelerator_branch_computes_every_view_and_selects_the_same(monkeypatch):
    """On a GPU every operation runs on the whole batch and torch.where keeps the views it applies to."""
    augment = ReplayableAugment(AugmentConfig(image_size=40, resize_size=44, min_crop_frac=0.6, degrees=90.0))
    images = [_photo(44 + i, 60, i) for i in range(12)]
    params = [augment.sample(view_generator(0, 0, i), (im.height, im.width)) for i, im in enumerate(images)]
    params[0][IDX["angle"]] = 0.0  # some views skip some operations
    params[1][IDX["blur_sigma"]] = 0.0
    params[2][IDX["brightness"]] = 1.0
    params[3][IDX["hue"]] = 0.0
    cpu, rows = _both(augment, images, params)
    monkeypatch.setattr(BatchedAugment, "select_rows_on_cpu", False)
    _, every = _both(augment, images, params)
    _assert_close(cpu, every)
    assert (every - rows).abs().max() < 1e-5  # float32 rounding of batch-shaped reductions
