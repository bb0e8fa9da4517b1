r"""Shards at scale: WebDataset shards, the teacher cache and training, at N = 10k, 100k and 1M unlabelled images.

For each N the script writes N synthetic 32x32 RGB JPEGs (a shape over a colour gradient, seeded) into WebDataset
tar shards of 10,000 samples, next to a small labelled ``data=shards`` dataset (4 classes, a ``cls`` key per sample,
``classes.txt``), and measures, on the unlabelled-images run ``data=shards data.unlabelled='wds:<N shards>'``:

1. writing the shards, and building their index (first open) against opening them again (index reused);
2. the data checks a first run makes (content digests against the test images, decoding every image; remembered);
3. ``pand cache build`` with the tiny random CLIP teacher (``teacher=tiny``, 32 px, ``cache.views`` views): time,
   size on disk, number of cache shards;
4. ``TeacherCache.open`` of the complete cache with the default verification ("auto"; which mode it applied);
5. a training run (``method=kd`` from the cache's embeddings, ResNet-18 at 32 px, ``data.num_workers`` loader
   workers, a fixed number of steps): images/s, and the memory of each loader worker while it iterates (RSS, PSS and
   USS from ``/proc/<pid>/smaps_rollup``), taken in the training process by the callback :class:`ScaleProbe`;

then prints the cost per image side by side. After step 2 (row 5b), ``--workers`` forked loader processes read
every image's bytes once, as an epoch reads them, and report their memory after the pass: what a worker copies of the
training process's per-image objects over an epoch, which 50 training steps only begin to show.

Last, the cache of one size is built again with ``cache.num_workers=0`` by 1 process with 2 threads
(``OMP_NUM_THREADS=2``), by 2 processes with 1 thread each (``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` /
``MASTER_PORT`` set as torchrun sets them) and by 1 process with 1 thread (``--parallel-configs``), and the caches are
compared byte for byte (every file under ``shards/``, and meta.json without its ``agreement`` field). The size table's
own runs give every process one thread (``--threads 1``): on 2 shared cores, torch's threads of a 2-thread process
wait for each other whenever another process holds a core.

    python benchmarks/scale_shards.py --sizes 10000                    # one size: 2-6 minutes on 2 shared cores
    python benchmarks/scale_shards.py --sizes 10000,100000,1000000 --parallel-rounds 2   # the README's (~30 min)
    python benchmarks/scale_shards.py --sizes 100000 --parallel-size 100000 --parallel-configs 2x1,1x1 \
        --parallel-rounds 2
    python benchmarks/scale_shards.py --sizes 200 --steps 3 --warmup 1 --parallel-size 0 --in-process  # the test

``--out DIR`` keeps the data there; by default it goes to a temporary folder under /tmp, removed at the end (each
size's files as soon as it is measured). Progress goes to stderr; the tables to stdout, or with ``--json`` to stderr
and the JSON result to stdout.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

try:  # the training process imports this module for ScaleProbe; the rest of the script does not need Lightning
    from lightning.pytorch.callbacks import Callback
except ImportError:  # pragma: no cover
    Callback = object  # type: ignore[assignment,misc]

ROOT = Path(__file__).resolve().parents[1]
SIDE = 32
SHARD_SAMPLES = 10_000
CLASSES = ("disc", "square", "ring", "diamond")
LABELLED_PER_CLASS, TEST_PER_CLASS = 50, 25
#: bytes a sample takes in a shard (512-byte header + the JPEG padded to 512 bytes), for the free-space check
SAMPLE_BYTES = 1_600


# -- synthetic images -------------------------------------------------------------------------------------------------
def synthetic_images(rng: np.random.Generator, classes: np.ndarray) -> np.ndarray:
    """uint8 ``[n, 32, 32, 3]``: per image a two-colour gradient at a random angle, one shape of its class (disc,
    square, ring, diamond) of random colour, size and place, and pixel noise."""
    n = len(classes)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    ends = rng.uniform(0, 255, (n, 2, 1, 1, 3)).astype(np.float32)
    angle = rng.uniform(0, 1, (n, 1, 1)).astype(np.float32)
    ramp = (angle * xx / (SIDE - 1) + (1 - angle) * yy / (SIDE - 1))[..., None]
    img = ends[:, 0] + (ends[:, 1] - ends[:, 0]) * ramp
    cx, cy = rng.uniform(8, 24, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(5, 11, (n, 1, 1)).astype(np.float32)
    dx, dy = xx - cx, yy - cy
    d2 = dx * dx + dy * dy
    k = classes[:, None, None]
    shape = np.where(k == 0, d2 <= r * r,
                     np.where(k == 1, np.maximum(np.abs(dx), np.abs(dy)) <= r * 0.8,
                              np.where(k == 2, np.abs(d2 - (r * 0.75) ** 2) <= r * 3,
                                       (np.abs(dy) + np.abs(dx) * 0.5 <= r * 0.8))))
    colour = rng.uniform(0, 255, (n, 1, 1, 3)).astype(np.float32)
    img = np.where(shape[..., None], colour, img)
    img += rng.standard_normal(img.shape, dtype=np.float32) * 6
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path: Path, keys: list[str], classes: np.ndarray, seed: int, labelled: bool) -> None:
    """One WebDataset shard: ``<key>.jpg`` (and ``<key>.cls`` when ``labelled``), in chunks of 1,000 images."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for start in range(0, len(keys), 1000):
            chunk = classes[start:start + 1000]
            for j, pixels in enumerate(synthetic_images(rng, chunk)):
                members = {"jpg": jpeg(pixels)}
                if labelled:
                    members["cls"] = str(int(chunk[j])).encode()
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{keys[start + j]}.{ext}")
                    info.size, info.mtime = len(data), 0
                    tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)


def write_unlabelled(folder: Path, n: int, seed: int) -> list[Path]:
    """``folder/00000.tar ...``: n images in shards of :data:`SHARD_SAMPLES`, classes drawn at random (no label kept:
    an unlabelled shard, as img2dataset writes them, has no ``cls``)."""
    paths = []
    for s in range(math.ceil(n / SHARD_SAMPLES)):
        lo, hi = s * SHARD_SAMPLES, min(n, (s + 1) * SHARD_SAMPLES)
        classes = np.random.default_rng([seed, s, 1]).integers(0, len(CLASSES), hi - lo)
        path = folder / f"{s:05d}.tar"
        write_shard(path, [f"{i:09d}" for i in range(lo, hi)], classes, seed=(seed << 20) + s, labelled=False)
        paths.append(path)
    return paths


def write_labelled(root: Path, seed: int) -> Path:
    """A ``data=shards`` dataset: ``train/00000.tar`` (50 per class), ``test/00000.tar`` (25 per class),
    ``classes.txt``."""
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in CLASSES))
    for split, per_class, offset in (("train", LABELLED_PER_CLASS, 0), ("test", TEST_PER_CLASS, 1)):
        classes = np.tile(np.arange(len(CLASSES)), per_class)
        keys = [f"{split}{i:06d}" for i in range(len(classes))]
        write_shard(root / split / "00000.tar", keys, classes, seed=seed * 1000 + offset, labelled=True)
    return root


def pattern(folder: Path, shards: int) -> str:
    return f"wds:{folder}/{{00000..{shards - 1:05d}}}.tar"


# -- memory of a process ----------------------------------------------------------------------------------------------
def smaps_rollup(pid: int) -> dict[str, float]:
    """MiB: rss, pss, uss (private clean + dirty), shared (clean + dirty), private_dirty (pages this process wrote:
    its own allocations and the copies of pages it shared with its parent until it wrote to them) and anonymous of
    process ``pid``."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[0].endswith(":") and parts[2] == "kB":
                fields[parts[0][:-1]] = int(parts[1])
    mib = 1024.0
    return {"rss": fields.get("Rss", 0) / mib, "pss": fields.get("Pss", 0) / mib,
            "uss": (fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)) / mib,
            "shared": (fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0)) / mib,
            "private_dirty": fields.get("Private_Dirty", 0) / mib, "anonymous": fields.get("Anonymous", 0) / mib}


def children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return sorted(set(out))


class ScaleProbe(Callback):
    """In the training process: the time of every training step and, at the end of step ``probe_at`` and of the last
    step, the memory of this process and of each of its children (the training loader's workers: the run has
    ``trainer.num_sanity_val_steps=0``, so no val worker exists yet). Writes ``out`` (JSON) after the last step."""

    def __init__(self, out: str, steps: int, warmup: int = 10, probe_at: int = 5) -> None:
        self.out, self.steps, self.warmup, self.probe_at = Path(out), int(steps), int(warmup), int(probe_at)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.images: list[int] = []
        self.probes: dict[str, Any] = {}

    def _probe(self, name: str) -> None:
        me = os.getpid()
        workers = {}
        for pid in children(me):
            try:
                workers[str(pid)] = smaps_rollup(pid)
            except OSError:
                pass
        self.probes[name] = {"main": smaps_rollup(me), "workers": workers}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ends.append(time.perf_counter())
        self.images.append(int(len(batch["index"])))
        step = len(self.ends)
        if step == self.probe_at:
            self._probe("early")
        if step == self.steps:
            self._probe("late")
            timed = slice(self.warmup, self.steps)
            seconds = self.ends[self.steps - 1] - self.starts[self.warmup]
            self.out.write_text(json.dumps({
                "steps": self.steps, "warmup": self.warmup, "timed_steps": self.steps - self.warmup,
                "probe_at": self.probe_at,
                "timed_images": sum(self.images[timed]), "timed_seconds": seconds,
                "images_per_s": sum(self.images[timed]) / seconds,
                "step_ms_median": 1000 * float(np.median(np.array(self.ends[timed]) - np.array(self.starts[timed]))),
                "probes": self.probes}))


def python_bytes_per_image(pool) -> dict[str, float]:
    """Bytes per training image that the training dataset holds (the labelled pool, then the unlabelled shards'
    :class:`~pand.data.tar_shards.ShardDataset`): in per-image Python objects (lists and the distinct objects in
    them) and in numpy arrays. Forked loader workers share these pages with the training process until they write to
    them; reading a Python object writes its reference count."""
    n = len(pool)
    python = arrays = 0
    seen: set[int] = set()
    for obj in (pool, getattr(pool, "labelled", None), getattr(pool, "unlabelled", None)):
        for value in vars(obj).values() if obj is not None else ():
            if isinstance(value, np.ndarray) and value.size > 1:
                arrays += value.nbytes
            elif isinstance(value, list) and len(value) > 1 and id(value) not in seen:
                seen.add(id(value))
                python += sys.getsizeof(value)
                for item in value:
                    if id(item) not in seen:
                        seen.add(id(item))
                        python += sys.getsizeof(item)
    return {"python": python / n, "numpy": arrays / n}


class _ReadEvery:
    """Item b: read images ``b * block ..`` of the training pool and their labels as the training loader's workers
    do (``TrainViews`` reads ``pool.targets[i]``; a shard image is read by ``ShardDataset.read_bytes``, which
    ``load_image`` calls before it decodes: the same per-image objects are touched, without the decode), then report
    this worker's memory."""

    def __init__(self, pool, block: int) -> None:
        self.pool, self.block = pool, block

    def __len__(self) -> int:
        return math.ceil(len(self.pool) / self.block)

    def __getitem__(self, b: int) -> dict[str, Any]:
        for i in range(b * self.block, min(len(self.pool), (b + 1) * self.block)):
            self.pool.targets[i]  # noqa: B018 - what TrainViews reads
            part, j = self.pool._part(i)  # TrainingPool: the labelled or the unlabelled dataset, and the index there
            if hasattr(part, "read_bytes"):
                part.read_bytes(j)
                str(part.member(j))  # load_image names the member for its decode error
            else:
                part.load_image(j)
        return {"pid": os.getpid(), "mem": smaps_rollup(os.getpid())}


def epoch_pass(pool, workers: int, block: int = 1000) -> dict[str, Any]:
    """Every image of ``pool`` read once by ``workers`` forked loader processes (as an epoch reads them, without the
    decode); the memory of each worker after its first block and after the pass."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_ReadEvery(pool, block), batch_size=None, num_workers=workers, collate_fn=lambda x: x)
    first: dict[int, dict[str, float]] = {}
    last: dict[int, dict[str, float]] = {}
    start = time.perf_counter()
    for item in loader:
        first.setdefault(item["pid"], item["mem"])
        last[item["pid"]] = item["mem"]
    seconds = time.perf_counter() - start
    return {"pass_s": seconds, "pass_images_per_s": len(pool) / seconds,
            "pass_first": list(first.values()), "pass_last": list(last.values())}


# -- helpers ----------------------------------------------------------------------------------------------------------
def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_overrides(args: argparse.Namespace, labelled: Path, unlabelled: str, cache: Path, run: Path) -> list[str]:
    """The run every step measures: the small labelled shards plus N unlabelled images from shards, tiny CLIP
    teacher, KD from the cache's zero-shot logits, ResNet-18 at 32 px."""
    return [
        "data=shards", f"data.root={labelled}", f"data.unlabelled='{unlabelled}'", "data.val_fraction=0.2",
        "data.image_size=32", "data.resize_size=36", f"data.batch_size={args.batch_size}",
        f"data.num_workers={args.workers}", "data.pin_memory=false",
        "teacher=tiny", "method=kd", "student=resnet18", "student.pretrained=false",
        f"cache.dir={cache}", f"cache.views={args.views}", f"cache.batch_size={args.cache_batch_size}",
        "trainer=cpu", "trainer.enable_progress_bar=false", f"run_dir={run}",
    ]


def pand_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "pand", *args]


def run_pand(cmd: list[str], env: dict[str, str], what: str, log_file: Path, in_process: bool = False) -> float:
    """Seconds ``pand <cmd>`` took: a new process (what a user runs), or with ``in_process`` (the test) a call of
    :func:`pand.cli.main` in this one, which saves the seconds of importing torch and Lightning again."""
    start = time.perf_counter()
    if in_process:
        import contextlib

        from pand.cli import main as pand_main

        with open(log_file, "w") as err, contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            code = pand_main(cmd[3:])
        if code:
            raise SystemExit(f"{what} failed (exit {code}); its log: {log_file}\n" + log_file.read_text()[-3000:])
        return time.perf_counter() - start
    with open(log_file, "w") as err:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed (exit {proc.returncode}); its log: {log_file}\n"
                         + log_file.read_text()[-3000:])
    return seconds


def child_env(base: dict[str, str], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in base.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                                      "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "PAND_RUN_DIR")}
    env.update(extra)
    return env


# -- one size ---------------------------------------------------------------------------------------------------------
def measure_size(n: int, args: argparse.Namespace, work: Path, labelled: Path, env: dict[str, str]) -> dict[str, Any]:
    from pand.cache.integrity import FULL_CHECK_BYTES, SAMPLE_ROWS, data_bytes
    from pand.cache.teacher import TeacherCache
    from pand.cache.teacher.layout import data_arrays
    from pand.config import compose, to_plain
    from pand.data.tar_shards import read_shards
    from pand.engine.data import PandDataModule

    row: dict[str, Any] = {"images": n}
    folder = work / "unlabelled"
    log(f"N={n:,}: writing {math.ceil(n / SHARD_SAMPLES)} shards")
    start = time.perf_counter()
    paths = write_unlabelled(folder, n, seed=args.seed)
    row["write_s"] = time.perf_counter() - start
    row["shards"] = len(paths)
    row["shard_bytes"] = sum(p.stat().st_size for p in paths)
    wds = pattern(folder, len(paths))

    log(f"N={n:,}: indexing the shards (first open), then opening them again")
    start = time.perf_counter()
    samples = read_shards(wds, setting="data.unlabelled")
    row["index_first_s"] = time.perf_counter() - start
    assert len(samples) == n, (len(samples), n)
    del samples
    start = time.perf_counter()
    samples = read_shards(wds, setting="data.unlabelled")
    row["index_again_s"] = time.perf_counter() - start
    del samples
    row["index_bytes"] = sum(p.stat().st_size for p in folder.glob("*.pand-index.json"))

    cache, run = work / "cache", work / "run"
    overrides = run_overrides(args, labelled, wds, cache, run)
    log(f"N={n:,}: the data checks of a first run (content digests, decoding every image)")
    config = to_plain(compose("train", overrides))
    start = time.perf_counter()
    data = PandDataModule(config["data"], seed=int(config["seed"]))
    pool = data.train_pool  # loads the splits: checks them by content, decodes every image (both remembered)
    row["data_checks_s"] = time.perf_counter() - start
    row["dataset_bytes_per_image"] = python_bytes_per_image(pool)
    log(f"N={n:,}: every image's bytes read once by {args.workers} loader workers (their memory after the pass)")
    row.update(epoch_pass(pool, args.workers))
    del data, pool

    log(f"N={n:,}: pand cache build (cache.num_workers={args.cache_workers})")
    row["cache_build_s"] = run_pand(pand_cmd("cache", "build", *overrides, f"cache.num_workers={args.cache_workers}"),
                                    env, "pand cache build", work / "cache-build.log", args.in_process)
    meta = json.loads((cache / "meta.json").read_text())
    row["cache_bytes"] = folder_bytes(cache)
    row["cache_shards"] = int(meta["num_shards"])
    row["cache_rows"] = int(meta["num_samples"])
    arrays = meta["arrays"]
    row_bytes = sum(data_bytes({"shape": arrays[a]["row"], "dtype": arrays[a]["dtype"]}) for a in data_arrays(meta))
    full = row["cache_rows"] * row_bytes <= FULL_CHECK_BYTES or row["cache_rows"] <= SAMPLE_ROWS + 2
    row["open_verify"] = "full" if full else f"sample ({SAMPLE_ROWS:,} rows + first + last)"

    log(f"N={n:,}: TeacherCache.open (verify=auto: {row['open_verify']})")
    start = time.perf_counter()
    TeacherCache.open(cache)
    row["open_s"] = time.perf_counter() - start

    log(f"N={n:,}: training {args.steps} steps")
    probe = work / "probe.json"
    train = [*overrides, "trainer.max_epochs=1", f"trainer.limit_train_batches={args.steps}",
             "trainer.num_sanity_val_steps=0", "test=false",
             "+callbacks.scale_probe._target_=scale_shards.ScaleProbe", f"+callbacks.scale_probe.out={probe}",
             f"+callbacks.scale_probe.steps={args.steps}", f"+callbacks.scale_probe.warmup={args.warmup}",
             f"+callbacks.scale_probe.probe_at={max(1, min(args.warmup, 5))}"]
    train_env = {**env, "PYTHONPATH": os.pathsep.join([str(ROOT / "benchmarks"), env.get("PYTHONPATH", "")])}
    row["train_wall_s"] = run_pand(pand_cmd("train", *train), train_env, "pand train", work / "train.log",
                                   args.in_process)
    summary = json.loads((run / "summary.json").read_text())
    row["train_loop_s"] = float(summary["train_seconds"])
    measured = json.loads(probe.read_text())
    row["train_images_per_s"] = measured["images_per_s"]
    row["train_step_ms"] = measured["step_ms_median"]
    row["train_timed_steps"] = measured["timed_steps"]
    row["train_warmup"] = measured["warmup"]
    row["train_probe_at"] = measured["probe_at"]
    for when in ("early", "late"):
        p = measured["probes"][when]
        workers = list(p["workers"].values())
        row[f"main_{when}"] = p["main"]
        row[f"workers_{when}"] = workers
    row["loader_workers"] = len(row["workers_late"])
    return row


def measure_parallel(n: int, args: argparse.Namespace, work: Path, labelled: Path, env: dict[str, str],
                     configs: list[tuple[int, int]], rounds: int = 1) -> dict[str, Any]:
    """Build the cache of size ``n`` once per ``(processes, threads per process)`` of ``configs`` and round (the
    configurations alternate, so that load from elsewhere falls on all of them), each with ``cache.num_workers=0``
    (nothing but those processes and threads); compare every cache of the last round with the first one's."""
    folder = work / "unlabelled"
    wds = pattern(folder, math.ceil(n / SHARD_SAMPLES))
    builds = [{"processes": procs, "threads": threads, "seconds": [],
               "folder": work / f"cache-{procs}proc{threads}thread"} for procs, threads in configs]
    for r in range(rounds):
        for b in builds:
            procs, threads, cache = b["processes"], b["threads"], b["folder"]
            name = cache.name
            shutil.rmtree(cache, ignore_errors=True)
            overrides = [*run_overrides(args, labelled, wds, cache, work / "unused-run"), "cache.num_workers=0"]
            log(f"N={n:,}: pand cache build with {procs} process{'es' if procs > 1 else ''} ({threads} thread"
                f"{'s' if threads > 1 else ''} each), round {r + 1} of {rounds}")
            start = time.perf_counter()
            if procs == 1:
                run_pand(pand_cmd("cache", "build", *overrides), child_env(env, OMP_NUM_THREADS=str(threads)),
                         f"pand cache build ({name})", work / f"{name}.log")
            else:  # as torchrun starts them: every process exists from the start, each knows its rank
                port = str(free_port())
                running = []
                for rank in range(procs):
                    e = child_env(env, OMP_NUM_THREADS=str(threads), RANK=str(rank), WORLD_SIZE=str(procs),
                                  LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(procs), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port)
                    log_file = work / f"{name}-rank{rank}.log"
                    running.append((subprocess.Popen(pand_cmd("cache", "build", *overrides), cwd=ROOT, env=e,
                                                     stdout=subprocess.DEVNULL, stderr=open(log_file, "w")),
                                    log_file))
                for proc, log_file in running:
                    if proc.wait() != 0:
                        raise SystemExit(f"pand cache build ({name}) failed; its log: {log_file}\n"
                                         + log_file.read_text()[-3000:])
            b["seconds"].append(time.perf_counter() - start)
            b.setdefault("loadavg", []).append(loadavg())
    first = builds[0]["folder"]
    base = next((b for b in builds if b["processes"] == 1), builds[0])
    for b in builds:
        b["median_s"] = float(np.median(b["seconds"]))
    for b in builds:
        b["speedup"] = base["median_s"] / b["median_s"]
        b["differing"] = same_cache(first, b["folder"]) if b["folder"] != first else []
    result = {"images": n, "rounds": rounds, "base": [base["processes"], base["threads"]],
              "files_compared": sum(1 for p in (first / "shards").rglob("*") if p.is_file()) + 1,
              "cache_shards": int(json.loads((first / "meta.json").read_text())["num_shards"])}
    for b in builds:
        b["folder"] = str(b["folder"])
    return {**result, "builds": builds}


def same_cache(a: Path, b: Path) -> list[str]:
    """The files that differ between caches ``a`` and ``b``: every file under shards/, and meta.json without its
    "agreement" field (the low-precision probe's measurement, not compared by pand either)."""
    files_a = sorted(p.relative_to(a) for p in (a / "shards").rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b) for p in (b / "shards").rglob("*") if p.is_file())
    differ = [str(p) for p in files_a if p not in files_b or (a / p).read_bytes() != (b / p).read_bytes()]
    differ += [str(p) for p in files_b if p not in files_a]
    meta_a, meta_b = (json.loads((c / "meta.json").read_text()) for c in (a, b))
    meta_a.pop("agreement", None)
    meta_b.pop("agreement", None)
    return differ + ([] if meta_a == meta_b else ["meta.json"])


# -- report -----------------------------------------------------------------------------------------------------------
def _mean(rows: list[dict[str, float]], key: str) -> float:
    return float(np.mean([r[key] for r in rows])) if rows else float("nan")


def tables(result: dict[str, Any]) -> str:
    rows = result["sizes"]
    head = "| what | " + " | ".join(f"N = {r['images']:,}" for r in rows) + " |"
    rule = "| --- | " + " | ".join("---:" for _ in rows) + " |"

    def line(label: str, fmt) -> str:
        return f"| {label} | " + " | ".join(fmt(r) for r in rows) + " |"

    def us(key: str, per: str = "images"):
        return lambda r: f"{1e6 * r[key] / r[per]:,.1f}"

    def mem(key: str, field: str, digits: int = 1):
        return lambda r: f"{_mean(r[key], field):,.{digits}f}"

    mib = 1 << 20
    steps = rows[0]["train_timed_steps"]
    out = [head, rule,
           line("unlabelled shards (10,000 images each)", lambda r: f"{r['shards']:,}"),
           line("shards on disk (MiB)", lambda r: f"{r['shard_bytes'] / mib:,.1f}"),
           line("1. write the shards (s)", lambda r: f"{r['write_s']:,.1f}"),
           line("1. index the shards, first open (s)", lambda r: f"{r['index_first_s']:,.2f}"),
           line("1. open them again, index reused (s)", lambda r: f"{r['index_again_s']:,.2f}"),
           line("1. index files on disk (MiB)", lambda r: f"{r['index_bytes'] / mib:,.1f}"),
           line("2. data checks of a first run: digests + decode every image (s)",
                lambda r: f"{r['data_checks_s']:,.1f}"),
           line("3. `pand cache build`, whole command (s)", lambda r: f"{r['cache_build_s']:,.1f}"),
           line("3. cache rows (unlabelled + 160 labelled)", lambda r: f"{r['cache_rows']:,}"),
           line("3. cache on disk (MiB)", lambda r: f"{r['cache_bytes'] / mib:,.1f}"),
           line("3. cache shards", lambda r: f"{r['cache_shards']:,}"),
           line("4. `TeacherCache.open`, verify auto (s)", lambda r: f"{r['open_s']:,.2f}"),
           line("4. verification applied", lambda r: r["open_verify"]),
           line("5. `pand train`, whole command (s)", lambda r: f"{r['train_wall_s']:,.1f}"),
           line(f"5. training images/s ({steps} steps after warm-up)", lambda r: f"{r['train_images_per_s']:,.1f}"),
           line("5. median step (ms)", lambda r: f"{r['train_step_ms']:,.1f}"),
           line("5. loader workers", lambda r: str(r["loader_workers"]))]
    for when, label in (("early", f"after {rows[0]['train_probe_at']} steps"),
                        ("late", f"after {steps + rows[0]['train_warmup']} steps")):
        for key in ("rss", "pss", "uss"):
            out.append(line(f"5. per loader worker, {key.upper()} {label} (MiB)", mem(f"workers_{when}", key)))
        out.append(line(f"5. per loader worker, of the USS written (Private_Dirty) {label} (MiB)",
                        mem(f"workers_{when}", "private_dirty")))
    out += [line("5. training process RSS at the last step (MiB)", lambda r: f"{r['main_late']['rss']:,.1f}"),
            line(f"5b. every image's bytes read once, {result['config']['workers']} loader workers (images/s)",
                 lambda r: f"{r['pass_images_per_s']:,.0f}"),
            line("5b. per loader worker, USS after its first 1,000 images (MiB)", mem("pass_first", "uss")),
            line("5b. per loader worker, USS after the pass (MiB)", mem("pass_last", "uss")),
            line("5b. per loader worker, of the USS written (Private_Dirty) after the pass (MiB)",
                 mem("pass_last", "private_dirty")),
            line("5b. per loader worker, PSS after the pass (MiB)", mem("pass_last", "pss")),
            line("5b. per loader worker, RSS after the pass (MiB)", mem("pass_last", "rss")),
            line("training dataset's per-image Python objects (bytes/image)",
                 lambda r: f"{r['dataset_bytes_per_image']['python']:,.1f}"),
            line("training dataset's numpy arrays (bytes/image)",
                 lambda r: f"{r['dataset_bytes_per_image']['numpy']:,.1f}")]
    per = [head, rule,
           line("write the shards (us/image)", us("write_s")),
           line("index the shards, first open (us/image)", us("index_first_s")),
           line("open them again (us/image)", us("index_again_s")),
           line("index on disk (bytes/image)", lambda r: f"{r['index_bytes'] / r['images']:,.1f}"),
           line("data checks of a first run (us/image)", us("data_checks_s")),
           line("cache build, whole command (us/image)", us("cache_build_s", "cache_rows")),
           line("cache on disk (bytes/image)", lambda r: f"{r['cache_bytes'] / r['cache_rows']:,.1f}"),
           line("cache open (us/image)", lambda r: f"{1e6 * r['open_s'] / r['cache_rows']:,.2f}"),
           line("training (ms/image)", lambda r: f"{1000 / r['train_images_per_s']:,.2f}"),
           line("loader worker USS while training (MiB, after the last step)", mem("workers_late", "uss")),
           line("loader worker USS growth over a pass (bytes/image read by it)",
                lambda r: f"{_growth(r):,.1f}")]
    text = ["Measured at each size:", "", *out, "", "Cost per image:", "", *per]
    for par in result.get("parallel") or []:
        first = par["builds"][0]
        text += ["", f"Cache build of N = {par['images']:,} (+ 160 labelled; {par['cache_shards']} cache shards), "
                     "cache.num_workers=0:", "",
                 f"| processes | threads each | seconds | speed-up over {par['base'][0]} x {par['base'][1]} | "
                 f"byte-identical to {first['processes']} x {first['threads']} |",
                 "| ---: | ---: | ---: | ---: | --- |"]
        for b in par["builds"]:
            same = "(the reference)" if b is first else ("yes" if not b["differing"] else
                                                         "NO: " + ", ".join(b["differing"][:3]))
            each = " / ".join(f"{x:,.1f}" for x in b["seconds"])
            seconds = each if len(b["seconds"]) == 1 else f"{b['median_s']:,.1f} (median of {each})"
            text.append(f"| {b['processes']} | {b['threads']} | {seconds} | {b['speedup']:.2f} | {same} |")
        text.append(f"({par['files_compared']} files compared: every file under shards/, and meta.json without "
                    "its \"agreement\")")
    text += ["", f"load average (1, 5, 15 min): {result['loadavg_start']} at the start, {result['loadavg_end']} at "
                 f"the end; {result['cpus']} CPUs; {result['seconds']:,.0f} s in all"]
    return "\n".join(text)


def _growth(r: dict[str, Any]) -> float:
    """Bytes of USS a loader worker gained per image it read, from its first block to the end of the pass."""
    workers = max(1, len(r["pass_last"]))
    gained = _mean(r["pass_last"], "uss") - _mean(r["pass_first"], "uss")
    return gained * (1 << 20) / max(1, r["cache_rows"] / workers - 1000)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated numbers of unlabelled images")
    ap.add_argument("--out", type=Path, default=None, help="keep the data here (default: a temp folder, removed)")
    ap.add_argument("--json", action="store_true", help="JSON on stdout (the tables go to stderr)")
    ap.add_argument("--steps", type=int, default=50, help="training steps (the first --warmup are not timed)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=2, help="training loader workers (data.num_workers)")
    ap.add_argument("--views", type=int, default=1, help="cache.views")
    ap.add_argument("--cache-workers", type=int, default=1, help="cache.num_workers of the size table's builds")
    ap.add_argument("--cache-batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP_NUM_THREADS of the size table's cache builds and training runs (one per process: on "
                         "2 shared cores, 2 threads per process make torch's threads wait for each other)")
    ap.add_argument("--parallel-size", default=None,
                    help="comma-separated sizes of the 1- vs 2-process cache builds (default: 10,000 if measured, "
                         "else the smallest size; 0: none)")
    ap.add_argument("--parallel-configs", default="1x2,2x1,1x1",
                    help="the builds compared, each PROCESSESxTHREADS (threads per process); the first is the one "
                         "the others are compared with byte for byte, the first single-process one the speed-ups' "
                         "base")
    ap.add_argument("--parallel-rounds", type=int, default=1,
                    help="build each of --parallel-configs this many times, alternating (median seconds)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--in-process", action="store_true",
                    help="run the size table's `pand cache build` and `pand train` in this process (the test: saves "
                         "importing torch again; the memory figures then include this process's)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    if args.steps <= args.warmup:
        args.warmup = max(0, args.steps // 2)
    if args.parallel_size is None:
        parallel = [10_000 if 10_000 in sizes else min(sizes)]
    else:
        parallel = [int(s) for s in str(args.parallel_size).split(",") if s.strip() and int(s)]
    if any(p not in sizes for p in parallel):
        ap.error(f"--parallel-size {args.parallel_size}: each must be one of --sizes")
    configs = [tuple(int(x) for x in c.lower().split("x")) for c in args.parallel_configs.split(",") if c.strip()]
    if not configs or any(len(c) != 2 or min(c) < 1 for c in configs):
        ap.error(f"--parallel-configs {args.parallel_configs}: expected e.g. 1x2,2x1")

    started = time.perf_counter()
    base = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="pand-scale-", dir="/tmp"))
    keep = args.out is not None
    base.mkdir(parents=True, exist_ok=True)
    need = int(max(sizes) * SAMPLE_BYTES * 1.25) + (1 << 30)
    free = shutil.disk_usage(base).free
    if free < need:
        raise SystemExit(f"{base} has {free / 2**30:.1f} GiB free; the largest size needs about "
                         f"{need / 2**30:.1f} GiB (shards, their index, the cache)")
    # pand remembers what it learnt about the data (shard index when the folder is read-only, verified images,
    # content digests) under PAND_CACHE_DIR: here, so nothing of another session's is reused and nothing is left.
    env = child_env(dict(os.environ), PAND_CACHE_DIR=str(base / "pand-cache"), PYTHONUNBUFFERED="1",
                    OMP_NUM_THREADS=str(args.threads))
    os.environ["PAND_CACHE_DIR"] = env["PAND_CACHE_DIR"]
    if args.in_process:
        import torch

        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {"loadavg_start": loadavg(), "cpus": os.cpu_count(), "sizes": [],
                              "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    log(f"load average at the start: {result['loadavg_start']}; {free / 2**30:.1f} GiB free on {base}")
    try:
        labelled = write_labelled(base / "labelled", seed=args.seed + 7)
        for n in sizes:
            work = base / f"n{n}"
            row = measure_size(n, args, work, labelled, env)
            result["sizes"].append(row)
            log(f"N={n:,}: done ({json.dumps({k: v for k, v in row.items() if k.endswith('_s')})})")
            if n in parallel:
                result.setdefault("parallel", []).append(
                    measure_parallel(n, args, work, labelled, env, configs, args.parallel_rounds))
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
                shutil.rmtree(base / "pand-cache", ignore_errors=True)
    finally:
        if not keep:
            shutil.rmtree(base, ignore_errors=True)
    result["loadavg_end"] = loadavg()
    result["seconds"] = time.perf_counter() - started
    text = tables(result)
    if args.json:
        print(text, file=sys.stderr)
        print(json.dumps(result, indent=1))
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
