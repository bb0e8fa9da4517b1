"""A damaged teacher cache is refused by a training run, naming the file; cache.rebuild=true repairs it."""

import json

from pand.cli import main
from tests.engine.conftest import tiny_overrides


def test_a_truncated_cache_is_refused_then_rebuilt_on_request(cub_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    common = ("method=vl2lite", f"cache.dir={cache}", "cache.views=2", "trainer.max_epochs=1", "test=false")
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "first", *common)]) == 0
    embeds = cache / "shards" / "00000" / "embeds.npy"
    embeds.write_bytes(embeds.read_bytes()[:-100])  # a copy that was cut short

    capsys.readouterr()
    assert main(["train", *tiny_overrides(cub_root, tmp_path / "second", *common)]) == 2
    err = capsys.readouterr().err
    assert "embeds.npy is" in err and "truncated" in err and "cache.rebuild=true" in err and "Traceback" not in err
    assert not (tmp_path / "second" / "checkpoints").exists()  # refused before training

    assert main(["train", *tiny_overrides(cub_root, tmp_path / "third", *common, "cache.rebuild=true")]) == 0
    capsys.readouterr()
    assert main(["cache", "build", *tiny_overrides(cub_root, tmp_path / "x", *common)[:-1]]) == 0
    streams = capsys.readouterr()
    assert "teacher cache complete" in streams.err and json.loads(streams.out)["views"] >= 1
