"""benchmarks/scale_shards.py at a tiny size: every step runs (shards, index, data checks, cache build and open,
training with the loader workers' memory) and every row of its tables is printed; and its comparison of two caches
finds a changed file and ignores meta.json's "agreement"."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "scale_shards.py"

SIZE_ROWS = (
    "unlabelled shards", "shards on disk", "1. write the shards", "1. index the shards, first open",
    "1. open them again, index reused", "1. index files on disk", "2. data checks of a first run",
    "3. `pand cache build`", "3. cache rows", "3. cache on disk", "3. cache shards", "4. `TeacherCache.open`",
    "4. verification applied", "5. `pand train`", "5. training images/s", "5. median step", "5. loader workers",
    "5. per loader worker, RSS after 1 steps", "5. per loader worker, PSS after 1 steps",
    "5. per loader worker, USS after 1 steps", "5. per loader worker, RSS after 3 steps",
    "5. per loader worker, PSS after 3 steps", "5. per loader worker, USS after 3 steps",
    "5. per loader worker, of the USS written (Private_Dirty) after 1 steps",
    "5. per loader worker, of the USS written (Private_Dirty) after 3 steps",
    "5b. per loader worker, of the USS written (Private_Dirty) after the pass",
    "5. training process RSS", "5b. every image's bytes read once", "5b. per loader worker, USS after its first",
    "5b. per loader worker, USS after the pass", "5b. per loader worker, PSS after the pass",
    "5b. per loader worker, RSS after the pass", "training dataset's per-image Python objects",
    "training dataset's numpy arrays",
)
PER_IMAGE_ROWS = (
    "write the shards (us/image)", "index the shards, first open (us/image)", "open them again (us/image)",
    "index on disk (bytes/image)", "data checks of a first run (us/image)", "cache build, whole command (us/image)",
    "cache on disk (bytes/image)", "cache open (us/image)", "training (ms/image)", "loader worker USS while training",
    "loader worker USS growth over a pass",
)


def _load():
    spec = importlib.util.spec_from_file_location("scale_shards_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_scale_benchmark_prints_every_row_at_a_tiny_size(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--sizes", "200", "--steps", "3", "--warmup", "1",
                          "--batch-size", "16", "--parallel-size", "0", "--in-process", "--out", str(tmp_path),
                          "--json"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout)
    lines = [line for line in out.stderr.splitlines() if line.startswith("| ")]
    for label in (*SIZE_ROWS, *PER_IMAGE_ROWS):
        assert any(line.startswith(f"| {label}") for line in lines), label
    assert "load average (1, 5, 15 min)" in out.stderr
    row = result["sizes"][0]
    assert row["images"] == 200 and row["shards"] == 1 and row["cache_rows"] == 360  # + 160 labelled
    assert row["open_verify"] == "full" and row["train_timed_steps"] == 2 and row["train_images_per_s"] > 0
    assert row["loader_workers"] == 2 and all(w["uss"] > 0 for w in row["workers_late"])
    assert (tmp_path / "n200" / "cache" / "meta.json").is_file()  # --out keeps the data


def test_two_caches_are_compared_file_by_file_without_the_agreement_field(tmp_path):
    same_cache = _load().same_cache
    for name in ("a", "b"):
        (tmp_path / name / "shards" / "00000").mkdir(parents=True)
        (tmp_path / name / "shards" / "00000" / "embeds.npy").write_bytes(b"rows")
        (tmp_path / name / "meta.json").write_text(json.dumps({"complete": True, "agreement": {"max": len(name)}}))
    a, b = tmp_path / "a", tmp_path / "b"
    assert same_cache(a, b) == []
    (b / "shards" / "00000" / "embeds.npy").write_bytes(b"rowz")
    (b / "shards" / "00001").mkdir()
    (b / "shards" / "00001" / "params.npy").write_bytes(b"p")
    (b / "meta.json").write_text(json.dumps({"complete": False}))
    assert same_cache(a, b) == ["shards/00000/embeds.npy", "shards/00001/params.npy", "meta.json"]
