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

    def failing_commit(folder_, f, rows, chunks):
        real_commit(folder_, f, rows, chunks)
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


# -- integrity: digests per chunk, checked on open; a damaged cache is rebuilt ---------------------------------------


def _flip_bytes(path, offset, n=8):
    """Alter ``n`` bytes of ``path`` in place: same size, other content."""
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _built(ds, folder, **kw):
    DecodedImageCache.build(ds, folder, 28, progress=False, chunk_size=4, **kw)
    return np.load(folder / "index.npy")


def _damage_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "decoded-image cache" in
            r.getMessage()]


def test_build_records_a_digest_per_chunk_and_marks_the_folder(cub_train, tmp_path):
    folder = tmp_path / "c"
    _built(cub_train, folder)
    chunks = np.load(folder / "chunks.npy")
    n = len(cub_train)
    assert chunks.dtype == images_mod.CHUNK_DTYPE
    assert chunks["stop"].tolist() == [*range(4, n, 4), n]
    assert (folder / ".pand-output").read_text().strip() == "decoded-images"


def test_pixels_altered_in_place_are_refused_by_open_and_rebuilt_by_the_run(cub_train, tmp_path, caplog):
    ds, folder = cub_train, tmp_path / "c"
    index = _built(ds, folder)
    fresh = [DecodedImageCache.open(folder, ds, 28).image(i) for i in range(len(ds))]
    size = (folder / "pixels.u8").stat().st_size
    _flip_bytes(folder / "pixels.u8", int(index[5, 0]) + 10)  # image 5: chunk 1 (images 4..7)
    assert (folder / "pixels.u8").stat().st_size == size

    with pytest.raises(images_mod.DecodedCacheDamagedError) as err:
        DecodedImageCache.open(folder, ds, 28)
    message = str(err.value)
    assert "\n" not in message and str(folder) in message
    assert "pixels.u8 chunk 1 (images 4..7, bytes" in message
    assert "does not match its digest in chunks.npy: the file was altered in place" in message

    caplog.set_level("WARNING")
    cached = with_decoded_cache(ds, folder, 28, progress=False)  # what a run with data.decoded_cache calls
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1
    assert str(folder) in warnings[0] and "chunk 1" in warnings[0] and "altered in place" in warnings[0]
    assert "rebuilding it" in warnings[0]
    assert all(torch.equal(cached.load_image(i), fresh[i]) for i in range(len(ds)))
    DecodedImageCache.open(folder, ds, 28, verify="full")


def test_truncated_pixels_are_refused_and_rebuilt(cub_train, tmp_path, caplog):
    ds, folder = cub_train, tmp_path / "c"
    _built(ds, folder)
    size = (folder / "pixels.u8").stat().st_size
    with open(folder / "pixels.u8", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(images_mod.DecodedCacheDamagedError,
                       match=rf"pixels\.u8 is {size - 100:,} bytes, expected {size:,}: truncated"):
        DecodedImageCache.open(folder, ds, 28)
    caplog.set_level("WARNING")
    cache = DecodedImageCache.ensure(ds, folder, 28, progress=False)
    assert len(_damage_warnings(caplog)) == 1 and "truncated" in _damage_warnings(caplog)[0]
    assert (folder / "pixels.u8").stat().st_size == size
    assert torch.equal(cache.image(len(ds) - 1), DecodedImageCache.open(folder, ds, 28).image(len(ds) - 1))


def test_index_altered_in_place_is_refused(cub_train, tmp_path):
    ds, folder = cub_train, tmp_path / "c"
    index = _built(ds, folder)
    assert tuple(index[1, 2:]) == (28, 42)
    altered = index.copy()
    altered[1, 2:] = (42, 28)  # same bytes, same offsets, same short side: only the digest sees it
    np.save(folder / "index.npy", altered)
    with pytest.raises(images_mod.DecodedCacheDamagedError,
                       match=r"the index\.npy rows of chunk 0 \(images 0\.\.3, .*\) do not match their digest"):
        DecodedImageCache.open(folder, ds, 28)
    altered = index.copy()
    altered[2, 0] += 1
    np.save(folder / "index.npy", altered)
    with pytest.raises(images_mod.DecodedCacheDamagedError, match=r"index\.npy row 2 is .*, expected offset"):
        DecodedImageCache.open(folder, ds, 28)


def test_a_sampled_check_always_covers_the_first_and_the_last_chunk(cub_train, tmp_path, monkeypatch):
    ds, folder = cub_train, tmp_path / "c"
    DecodedImageCache.build(ds, folder, 28, progress=False, chunk_size=1)  # 12 chunks of one image
    checked = []
    real_damage = images_mod._chunk_damage
    monkeypatch.setattr(images_mod, "_chunk_damage", lambda *a: checked.append(a[-1]) or real_damage(*a))
    monkeypatch.setattr(images_mod, "SAMPLE_BYTES", 1)  # one random chunk besides the first and the last
    DecodedImageCache.open(folder, ds, 28, verify="sample")
    assert len(checked) <= 3 and {0, len(ds) - 1} <= set(checked)  # the random one may be one of them
    checked.clear()
    DecodedImageCache.open(folder, ds, 28)  # "auto": all of a cache of up to 1 GiB
    assert checked == list(range(len(ds)))

    index = np.load(folder / "index.npy")
    _flip_bytes(folder / "pixels.u8", int(index[-1, 0]))
    with pytest.raises(images_mod.DecodedCacheDamagedError, match=rf"chunk {len(ds) - 1} \(images 11\.\.11"):
        DecodedImageCache.open(folder, ds, 28, verify="sample")


def test_a_reader_names_a_pixels_file_cut_after_open(cub_train, tmp_path):
    ds, folder = cub_train, tmp_path / "c"
    _built(ds, folder)
    cache = DecodedImageCache.open(folder, ds, 28)
    with open(folder / "pixels.u8", "r+b") as f:
        f.truncate(50)
    with pytest.raises(images_mod.DecodedCacheDamagedError,
                       match=r"pixels\.u8 is 50 bytes, expected .*: it changed after the cache was opened"):
        cache.image(0)


def test_resume_decodes_again_from_the_first_damaged_chunk(cub_train, tmp_path, monkeypatch, caplog):
    ds, folder = cub_train, tmp_path / "c"
    real_commit = DecodedImageCache._commit_chunk
    calls = {"n": 0}

    def failing_commit(*args):
        real_commit(*args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(DecodedImageCache, "_commit_chunk", staticmethod(failing_commit))
    with pytest.raises(KeyboardInterrupt):
        DecodedImageCache.build(ds, folder, 28, progress=False, chunk_size=4)
    monkeypatch.setattr(DecodedImageCache, "_commit_chunk", staticmethod(real_commit))
    index = np.load(folder / "index.npy")
    assert len(index) == 8
    _flip_bytes(folder / "pixels.u8", int(index[6, 0]))  # chunk 1 of the interrupted build

    decoded = []
    real_decode = images_mod._decode_resized
    monkeypatch.setattr(images_mod, "_decode_resized", lambda d, i, s: decoded.append(i) or real_decode(d, i, s))
    caplog.set_level("WARNING")
    cache = DecodedImageCache.ensure(ds, folder, 28, progress=False, chunk_size=4)
    assert decoded == list(range(4, len(ds)))  # chunk 0 kept, chunk 1 and after decoded again
    warnings = _damage_warnings(caplog)
    assert len(warnings) == 1 and "chunk 1 (images 4..7" in warnings[0] and "from image 4" in warnings[0]
    fresh = DecodedImageCache.build(ds, tmp_path / "fresh", 28, progress=False)
    assert all(torch.equal(cache.image(i), fresh.image(i)) for i in range(len(ds)))


def test_a_cache_of_the_previous_format_is_rebuilt_not_trusted(cub_train, tmp_path, caplog):
    ds, folder = cub_train, tmp_path / "c"
    _built(ds, folder)
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "format_version": 1}))
    (folder / "chunks.npy").unlink()
    caplog.set_level("WARNING")
    DecodedImageCache.ensure(ds, folder, 28, progress=False)
    assert any("stale (format_version: stored 1, expected 2)" in w for w in _damage_warnings(caplog))
    assert (folder / "chunks.npy").is_file()


def test_a_garbled_index_or_chunk_file_is_refused_and_rebuilt(cub_train, tmp_path, caplog):
    ds, folder = cub_train, tmp_path / "c"
    _built(ds, folder)
    data = (folder / "index.npy").read_bytes()
    (folder / "index.npy").write_bytes(data[: len(data) - 16])
    with pytest.raises(images_mod.DecodedCacheDamagedError, match=r"index\.npy cannot be read"):
        DecodedImageCache.open(folder, ds, 28)
    caplog.set_level("WARNING")
    DecodedImageCache.ensure(ds, folder, 28, progress=False)
    assert len(_damage_warnings(caplog)) == 1 and "index.npy cannot be read" in _damage_warnings(caplog)[0]

    # an interrupted build whose chunks.npy is garbled starts again from the first image
    meta = json.loads((folder / "meta.json").read_text())
    (folder / "meta.json").write_text(json.dumps({**meta, "complete": False}))
    (folder / "chunks.npy").write_bytes(b"\x93NUMPY garbage")
    caplog.clear()
    cache = DecodedImageCache.ensure(ds, folder, 28, progress=False)
    assert len(_damage_warnings(caplog)) == 1 and "decoding every image again" in _damage_warnings(caplog)[0]
    DecodedImageCache.open(folder, ds, 28, verify="full")
    assert len(cache) == len(ds)


def test_a_second_build_of_a_folder_waits_for_the_first(cub_train, tmp_path):
    import threading

    from pand.locks import FolderLock

    folder = tmp_path / "decoded"
    first = FolderLock(folder, "decoded-image cache").acquire()  # another build, in the middle of its work
    done = []
    second = threading.Thread(target=lambda: done.append(DecodedImageCache.build(cub_train, folder, 28, progress=False)))
    second.start()
    second.join(1.0)
    assert second.is_alive() and not (folder / "meta.json").exists()  # waiting, writing nothing
    first.release()
    second.join(60)
    assert done and len(done[0]) == len(cub_train)
    assert not second.is_alive()
