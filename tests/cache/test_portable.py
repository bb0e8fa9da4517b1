"""A teacher cache leaves as WebDataset tars (pand cache export) and comes back byte-identical (pand cache import);
pand cache verify checks every row of a copy."""

import io
import json
import tarfile

import numpy as np
import pytest

from pand.cache.teacher import TeacherCache
from pand.cli import main
from tests.engine.conftest import tiny_overrides


@pytest.fixture
def exported(cub_root, tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "wds"
    overrides = tiny_overrides(cub_root, tmp_path / "run", f"cache.dir={cache}", "cache.views=2",
                               "cache.shard_size=5")
    assert main(["cache", "build", *overrides]) == 0
    assert main(["cache", "export", *overrides, f"out={out}"]) == 0
    return cache, out, overrides


def _shard_files(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted((folder / "shards").rglob("*")) if p.is_file()}


def test_export_writes_one_webdataset_sample_per_image_and_import_restores_the_cache(exported, tmp_path, capsys):
    cache, out, _ = exported
    meta = json.loads((out / "meta.json").read_text())
    original = TeacherCache.open(cache)
    assert sorted(meta["export"]["tars"]) == ["00000.tar", "00001.tar", "00002.tar"]  # 15 images, 5 per shard
    with tarfile.open(out / "00001.tar") as tar:
        names = tar.getnames()
        assert names[:3] == ["000000005.json", "000000005.params.npy", "000000005.embeds.npy"]
        record = json.loads(tar.extractfile("000000005.json").read())
        embeds = np.load(io.BytesIO(tar.extractfile("000000005.embeds.npy").read()))
    pool_id = record["image"]
    assert record["index"] == 5 and pool_id.endswith(".jpg") and record["label"] in (0, 1, 2)
    np.testing.assert_array_equal(embeds, original.array("embeds")[5])

    restored = tmp_path / "restored"
    assert main(["cache", "import", f"src={out}", f"cache.dir={restored}"]) == 0
    assert _shard_files(restored) == _shard_files(cache)
    assert TeacherCache.open(restored).meta == original.meta
    capsys.readouterr()
    assert main(["cache", "verify", f"cache.dir={restored}"]) == 0
    assert json.loads(capsys.readouterr().out)["verified"] == "full"


def test_an_altered_export_is_refused_naming_the_tar(exported, tmp_path, capsys):
    _, out, _ = exported
    data = bytearray((out / "00002.tar").read_bytes())
    data[700] ^= 0xFF
    (out / "00002.tar").write_bytes(bytes(data))
    assert main(["cache", "import", f"src={out}", f"cache.dir={tmp_path / 'restored'}"]) == 2
    assert "00002.tar does not match its checksum" in capsys.readouterr().err


def test_export_into_a_folder_that_holds_files_is_refused(exported, capsys):
    _, out, overrides = exported
    assert main(["cache", "export", *overrides, f"out={out}"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_verify_names_a_damaged_row(exported, capsys):
    cache, _, _ = exported
    path = cache / "shards" / "00001" / "embeds.npy"
    rows = np.load(path, mmap_mode="r")
    offset = rows.offset + rows[0].nbytes + 3  # inside row 1
    del rows
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["cache", "verify", f"cache.dir={cache}"]) == 2
    assert "shards/00001/embeds.npy row 1 (image 6) does not match its checksum" in capsys.readouterr().err
