"""Independent runs side by side in worker processes, with a progress line and an estimate of the time left.

Small students do not keep several cores busy: ResNet-18 on 32 px batches of 32 runs about as fast on one CPU thread
as on two, so two runs with one thread each finish in about half the time of the same runs one after the other with
two threads. :func:`run_jobs` runs a list of independent jobs that way: ``workers`` processes (spawned, so nothing of
the parent's state is shared), each with ``cores // workers`` threads, the heaviest jobs first so that the last ones
to finish are short. A job's output goes to its own log file; the parent prints one line per finished job with the
time left, estimated from the jobs' expected costs (``Job.weight``) and the time the finished ones took.

A run's figures do not depend on where it ran, up to floating-point summation order: one thread or two sum a
convolution's products in another order, which moves an accuracy by at most a test image or two.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pand.errors import PandError
from pand.logs import setup_logging

#: More workers than this rarely pay on one machine: each holds its data and models in memory.
MAX_WORKERS = 4


@dataclass(frozen=True)
class Job:
    """One independent run: ``fn(*args)`` (``fn`` a module-level function, so that a worker can import it)."""

    name: str
    fn: Callable[..., Any]
    args: tuple = ()
    #: expected cost relative to the other jobs: sets the order (heaviest first) and the time-left estimate
    weight: float = 1.0
    #: where the job's output goes when it runs in a worker (in the parent, it prints as usual)
    log: Path | None = None
    info: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Done:
    job: Job
    result: Any
    seconds: float


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_workers(n_jobs: int, cores: int | None = None) -> int:
    """As many workers as cores (one thread each), at most :data:`MAX_WORKERS` and at most one per job."""
    return max(1, min(n_jobs, cores or available_cores(), MAX_WORKERS))


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """``[k/n] name: what it gave, in s; elapsed m:ss, about m:ss left``.

    The estimate: the finished jobs' seconds per unit of weight on one worker, times the weight left, shared by the
    ``workers`` (or by the jobs left, when fewer).
    """

    def __init__(self, jobs: Sequence[Job], start: float | None = None, printer: Callable[[str], None] = print,
                 workers: int = 1):
        self.total = sum(j.weight for j in jobs)
        self.n = len(jobs)
        self.workers = max(1, workers)
        self.done_weight = 0.0
        self.done_seconds = 0.0
        self.done = 0
        self.start = time.time() if start is None else start
        self.printer = printer

    def left(self, now: float) -> float:
        if self.done_weight <= 0:
            return float("nan")
        share = max(1, min(self.workers, self.n - self.done))
        return self.done_seconds / self.done_weight * (self.total - self.done_weight) / share

    def finished(self, job: Job, seconds: float, what: str = "") -> str:
        self.done += 1
        self.done_weight += job.weight
        self.done_seconds += seconds
        now = time.time()
        line = f"[{self.done}/{self.n}] {job.name}: {what + ', ' if what else ''}{seconds:.0f} s; elapsed " \
               f"{format_seconds(now - self.start)}"
        if self.done < self.n:
            line += f", about {format_seconds(self.left(now))} left"
        self.printer(line)
        return line


def _init_worker(threads: int, gpus=None) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if gpus is not None:  # this worker's own GPU, before torch initialises CUDA
        os.environ["CUDA_VISIBLE_DEVICES"] = gpus.get()
    import torch

    torch.set_num_threads(threads)
    setup_logging()  # as the command line logs: each line once


def _run_logged(fn: Callable[..., Any], args: tuple, log: str | None) -> tuple[Any, float]:
    start = time.time()
    if log is None:
        return fn(*args), time.time() - start
    Path(log).parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        sys.stdout.flush()
        sys.stderr.flush()
        # File descriptors, not sys.stdout: Lightning's and PyTorch's C-level output goes there too.
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        result = fn(*args)
        sys.stdout.flush()
        sys.stderr.flush()
    return result, time.time() - start


def run_jobs(jobs: Sequence[Job], workers: int, *, describe: Callable[[Job, Any], str] = lambda job, result: "",
             printer: Callable[[str], None] = print, cores: int | None = None,
             gpus: Sequence[str] | None = None) -> list[Done]:
    """Run every job (in ``workers`` processes, or here one after the other when ``workers`` is 1) and return them
    done, in the order given. The first failure stops the rest and is raised, naming the job and its log.

    ``gpus``: CUDA device ids, at least one per worker; each worker sees only its own (``CUDA_VISIBLE_DEVICES``), so
    that runs side by side never share a GPU."""
    if gpus is not None and workers > 1 and len(gpus) < workers:
        raise PandError(f"{workers} runs side by side need a GPU each; {len(gpus)} given ({', '.join(gpus)})")
    progress = Progress(jobs, printer=printer, workers=workers)
    if workers <= 1:
        out = []
        for job in jobs:
            result, seconds = _run_logged(job.fn, job.args, None)
            progress.finished(job, seconds, describe(job, result))
            out.append(Done(job, result, seconds))
        return out
    threads = max(1, (cores or available_cores()) // workers)
    order = sorted(jobs, key=lambda j: -j.weight)  # heaviest first: the last to finish are short ones
    done: dict[int, Done] = {}
    context = multiprocessing.get_context("spawn")  # a fork would copy the parent's threads and open files
    gpu_queue = None
    if gpus is not None:
        gpu_queue = context.Queue()
        for gpu in list(gpus)[:workers]:
            gpu_queue.put(str(gpu))
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker,
                                initargs=(threads, gpu_queue)) as pool:
        futures = {pool.submit(_run_logged, job.fn, job.args, str(job.log) if job.log else None): job
                   for job in order}
        try:
            for future in cf.as_completed(futures):
                job = futures[future]
                try:
                    result, seconds = future.result()
                except Exception as err:  # noqa: BLE001 - any failure of a run stops the rest, named
                    where = f"; its output: {job.log}" if job.log else ""
                    raise PandError(f"{job.name} failed: {type(err).__name__}: {err}{where}") from err
                progress.finished(job, seconds, describe(job, result))
                done[id(job)] = Done(job, result, seconds)
        except BaseException:
            for future in futures:
                future.cancel()
            raise
    return [done[id(job)] for job in jobs]
