import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import pand.cache.images as images_mod
from pand.cache import CachedImageDataset, DecodedImageCache, with_decoded_cache
from pand.data import cub
from pand.data.transforms import AugmentConfig, ReplayableAugment, eval_transform, view_generator
from pand.errors import MismatchError, PandError
from tests.fixtures.datasets import make_cub

SMALL = AugmentConfig(image_size=24, resize_size=28)  # 32x32 fixture images are downsized
DEFAULT = AugmentConfig()  # 224/256: upsized


def _noise_jpeg(path, w, h, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path, format="JPEG", quality=90)


@pytest.fixture
def cub_train(tmp_path):
    d = make_cub(tmp_path / "data")
    ds = cub.load(d, "train")
    # non-square originals: one landscape (48 wide x 32 high), one portrait (32 wide x 45 high)
    _noise_jpeg(ds.path(1), 48, 32, seed=1)
    _noise_jpeg(ds.path(4), 32, 45, seed=2)
    return cub.load(d, "train")


def test_bit_exact_augment_and_same_params(cub_train, tmp_path):
    ds = cub_train
    for cfg in (SMALL, DEFAULT):
        folder = tmp_path / f"cache{cfg.resize_size}"
        DecodedImageCache.build(ds, folder, cfg.resize_size, progress=False, chunk_size=5)
        cache = DecodedImageCache.open(folder, ds, cfg.resize_size)
        assert len(cache) == len(ds)
        aug = ReplayableAugment(cfg)
        ev = eval_transform(cfg.image_size, cfg.resize_size)
        indices = range(len(ds)) if cfg is SMALL else (0, 1, 4)
        for i in indices:
            pil = ds.load_image(i)
            x = cache.image(i)
            assert x.dtype == torch.uint8 and x.shape[0] == 3 and min(x.shape[1:]) == cfg.resize_size
            if i == 1:
                assert (pil.height, pil.width) == (32, 48)
            for k in range(3 if cfg is SMALL else 2):
                p_orig = aug.sample(view_generator(0, k, i), (pil.height, pil.width))
                p_cache = aug.sample(view_generator(0, k, i), tuple(x.shape[1:]))
                assert torch.equal(p_orig, p_cache)
                assert torch.equal(aug.apply(x, p_orig), aug.apply(pil, p_orig))
            # identity params and the eval transform use the same resize, hence the same pixels
            p_id = aug.identity_params((pil.height, pil.width))
            assert torch.equal(p_id, aug.identity_params(tuple(x.shape[1:])))
            assert torch.equal(aug.apply(x, p_id), aug.apply(pil, p_id))
            assert torch.equal(ev(x), ev(pil))


def test_meta_and_layout(cub_train, tmp_path):
    folder = tmp_path / "c"
    cache = DecodedImageCache.build(cub_train, folder, 28, progress=False)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["complete"] is True
    assert meta["name"] == "cub" and meta["split"] == "train" and meta["resize_size"] == 28
    assert meta["fingerprint"] == cub_train.fingerprint() and meta["num_images"] == len(cub_train)
    assert "resize_fn" in meta and meta["kind"] == "pand.decoded_images"
    index = np.load(folder / "index.npy")
    assert index.shape == (len(cub_train), 4)
    assert (folder / "pixels.u8").stat().st_size == int((index[:, 1] * index[:, 2] * index[:, 3]).sum())
    assert tuple(cache.image(1).shape) == (3, 28, 42)  # 32x48 -> short side 28: int(28 * 48 / 32) = 42
    assert tuple(cache.image(4).shape) == (3, 39, 28)
    assert torch.equal(cache.image(-1), cache.image(len(cache) - 1))
    with pytest.raises(IndexError):
        cache.image(len(cache))


def test_interrupted_build_is_not_complete_and_ensure_resumes(cub_train, tmp_path, monkeypatch):
    ds = cub_train
    folder = tmp_path / "c"
    real_commit = DecodedImageCache._commit_chunk
    calls = {"n": 0}

    def failing_commit(folder_, f, rows):
        real_commit(folder_, f, rows)
        calls["n"] += 1
        if calls["n"] == 1:
            f.write(b"garbage of a half-written chunk")  # bytes past the recorded index must be dropped on resume
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(DecodedImageCache, "_commit_chunk", staticmethod(failing_commit))
    with pytest.raises(KeyboardInterrupt):
        DecodedImageCache.build(ds, folder, 28, progress=False, chunk_size=4)
    monkeypatch.setattr(DecodedImageCache, "_commit_chunk", staticmethod(real_commit))

    assert json.loads((folder / "meta.json").read_text())["complete"] is False
    assert len(np.load(folder / "index.npy")) == 4
    with pytest.raises(PandError, match="incomplete"):
        DecodedImageCache.open(folder, ds, 28)

    decoded = []
    real_decode = images_mod._decode_resized
    monkeypatch.setattr(images_mod, "_decode_resized", lambda d, i, s: decoded.append(i) or real_decode(d, i, s))
    cache = DecodedImageCache.ensure(ds, folder, 28, progress=False, chunk_size=4)
    assert decoded == list(range(4, len(ds)))  # resumed, not restarted
    assert json.loads((folder / "meta.json").read_text())["complete"] is True
    fresh = DecodedImageCache.build(ds, tmp_path / "fresh", 28, progress=False)
    for i in range(len(ds)):
        assert torch.equal(cache.image(i), fresh.image(i))

    # complete: ensure only opens
    decoded.clear()
    DecodedImageCache.ensure(ds, folder, 28, progress=False)
    assert decoded == []


def test_deleted_meta_is_rebuilt(cub_train, tmp_path):
    folder = tmp_path / "c"
    DecodedImageCache.build(cub_train, folder, 28, progress=False)
    (folder / "meta.json").unlink()
    with pytest.raises(PandError, match="no decoded-image cache"):
        DecodedImageCache.open(folder, cub_train, 28)
    cache = DecodedImageCache.ensure(cub_train, folder, 28, progress=False)
    assert len(cache) == len(cub_train)
    assert json.loads((folder / "meta.json").read_text())["complete"] is True


def test_mismatches_are_refused(cub_train, tmp_path):
    ds = cub_train
    folder = tmp_path / "c"
    DecodedImageCache.build(ds, folder, 28, progress=False)

    with pytest.raises(MismatchError, match="resize_size: stored 28, expected 32"):
        DecodedImageCache.open(folder, ds, 32)
    with pytest.raises(MismatchError, match="resize_size"):  # ensure does not overwrite another size's cache
        DecodedImageCache.ensure(ds, folder, 32, progress=False)

    test = cub.load(ds.root, "test")
    with pytest.raises(MismatchError, match="split: stored 'train', expected 'test'") as err:
        DecodedImageCache.open(folder, test, 28)
    assert "fingerprint" in str(err.value)

    # same dataset, one image replaced: other fingerprint
    _noise_jpeg(ds.path(0), 40, 30, seed=9)
    changed = cub.load(ds.root, "train")
    with pytest.raises(MismatchError, match="fingerprint: stored"):
        DecodedImageCache.open(folder, changed, 28)
    # ensure treats it as stale content of the same data and rebuilds
    cache = DecodedImageCache.ensure(changed, folder, 28, progress=False)
    assert tuple(cache.image(0).shape) == (3, 28, 37)
    DecodedImageCache.open(folder, changed, 28)


class _Views(Dataset):
    def __init__(self, dataset, augment):
        self.dataset, self.augment = dataset, augment

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        view, params = self.augment(self.dataset.load_image(i), view_generator(7, 0, i))
        return view, params, self.dataset.targets[i]


def test_dataloader_workers_over_cached_dataset(cub_train, tmp_path):
    ds = cub_train
    cached = with_decoded_cache(ds, tmp_path / "c", 28, progress=False, num_workers=2)
    assert isinstance(cached, CachedImageDataset)
    assert (cached.name, cached.split, cached.classes, cached.targets) == (ds.name, ds.split, ds.classes, ds.targets)
    assert cached.fingerprint() == ds.fingerprint()
    assert [cached.sample_id(i) for i in range(len(ds))] == [ds.sample_id(i) for i in range(len(ds))]
    cached.cache.image(0)  # an opened memmap in the parent must not be pickled to the workers
    aug = ReplayableAugment(SMALL)

    def run(dataset, workers):
        loader = DataLoader(_Views(dataset, aug), batch_size=4, num_workers=workers, shuffle=False)
        return [torch.cat(t) if isinstance(t[0], torch.Tensor) else t for t in zip(*loader)]

    got = run(cached, 2)
    ref = run(ds, 0)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1]) and torch.equal(got[2], ref[2])
    assert got[0].shape == (len(ds), 3, 24, 24)

    # raw cached uint8 images collate too (equal sizes after a square-only subset)
    from pand.data import subset

    square = [i for i in range(len(ds)) if i not in (1, 4)]
    sub = with_decoded_cache(subset(ds, square), tmp_path / "sub", 28, progress=False)
    batches = list(DataLoader(sub, batch_size=5, num_workers=2, collate_fn=None, shuffle=False))
    assert sum(len(b[0]) for b in batches) == len(square)
    assert batches[0][0].dtype == torch.uint8 and batches[0][0].shape[1:] == (3, 28, 28)
