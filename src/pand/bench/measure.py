"""The measurements of ``pand bench`` (see :mod:`pand.bench` for what each option times).

Kept apart from the command line so that ``pand bench --help`` answers without importing torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pand.bench.exported import exported_rows
from pand.bench.loader import measure_loader_throughput, run_estimates
from pand.cache.teacher import CachedTeacherSource, TeacherCache
from pand.cache.teacher.layout import write_cache
from pand.distillers import Progress, TeacherContext, build_distiller
from pand.engine.builders import build_optimizer
from pand.engine.teacher_side import add_stages
from pand.jobs import Job, available_cores, default_workers, run_jobs
from pand.rules import resolve_device
from pand.students import build_student
from pand.teachers import ClassifierTeacher, LiveTeacherSource, ZeroShotLogits, load_clip_teacher
from pand.teachers.classifier import create_classifier
from pand.teachers.clip import RANDOM_WEIGHTS


def _device(name: str) -> torch.device:
    return torch.device(resolve_device(name))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: The optimizer of every timed step: pand train's default (AdamW, with torch's fused kernel where it has one).
BENCH_OPTIM = {"_target_": "torch.optim.AdamW", "lr": 1e-4, "weight_decay": 1e-4}


class _Step:
    """One configuration: a distiller, its teacher source and an optimizer (``optim``: keywords over
    :data:`BENCH_OPTIM`, built as ``pand train`` builds its own)."""

    def __init__(self, name, distiller, source, device, autocast, channels_last, optim=None):
        self.name, self.distiller, self.source = name, distiller.to(device), source
        self.device, self.autocast, self.channels_last = device, autocast, channels_last
        if channels_last:
            self.distiller.to(memory_format=torch.channels_last)
        self.optimizer = build_optimizer({**BENCH_OPTIM, **(optim or {})},
                                         [p for p in distiller.parameters() if p.requires_grad])
        self.distiller.train()

    def __call__(self, batch) -> float:
        _sync(self.device)
        start = time.perf_counter()
        images = batch["image"].to(self.device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        b = {**batch, "image": images, "label": batch["label"].to(self.device)}
        with self.autocast():
            teacher = self.source(b, self.distiller.requires) if self.distiller.requires else {}
            out = self.distiller.training_losses(b, teacher, Progress(1, 10))
            loss = torch.stack([v.float() for v in out.losses.values()]).sum()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        _sync(self.device)
        return (time.perf_counter() - start) * 1000.0


def _fake_cache(folder: Path, n: int, views: int, dim: int, num_params: int) -> TeacherCache:
    """A complete cache of the benchmark's size (random normalised embeddings): the read path is what is timed."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((n, views, dim)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    meta = write_cache(folder, {"views": views, "seed": 0, "embed_dim": dim},
                       {"params": np.zeros((n, views, num_params), np.float32), "embeds": emb.astype(np.float16)})
    return TeacherCache(folder, meta)


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    use_bf16 = args.precision == "bf16"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext()

    if args.latency:
        result: dict[str, Any] = {"config": _config(args, device),
                                  "latency": _latency_bench(args, device, autocast)}
    else:
        result = _training_bench(args, device, autocast)
    if args.zoo:
        result["zoo"] = _zoo_bench(args, device, autocast)
    if args.loader:
        student_ms = result.get("student_only_ms") or _student_step_ms(args, device, autocast)
        result["loader"] = _loader_bench(args, device, student_ms)
    if args.parallel:
        result["parallel"] = _parallel_bench(args)
    return result


def _config(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    return {
        "teacher": args.teacher, "student": args.student, "image_size": args.image_size, "batch": args.batch,
        "classes": args.classes, "steps": args.steps, "warmup": args.warmup, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "threads": torch.get_num_threads(), "precision": args.precision, "channels_last": args.channels_last,
        "torch": torch.__version__,
    }


def _training_bench(args: argparse.Namespace, device: torch.device, autocast) -> dict[str, Any]:
    teacher = load_clip_teacher(args.teacher, args.pretrained or RANDOM_WEIGHTS, device=str(device),
                                image_size=args.teacher_image_size or args.image_size)
    if args.channels_last:
        teacher.model.to(memory_format=torch.channels_last)
    classes = [f"class {i}" for i in range(args.classes)]
    text = teacher.class_embeddings(classes, ["a photo of a {}."]).cpu()
    context = TeacherContext(embed_dim=teacher.embed_dim, logit_scale=teacher.logit_scale, text_embeds=text,
                             identity=teacher.identity,
                             prompt_embeds=F.normalize(text + 0.01 * torch.randn_like(text), dim=-1))
    mean, std = teacher.mean, teacher.std
    live = LiveTeacherSource(teacher, mean, std)
    n_images, views = args.batch * args.steps, 2
    tmp = tempfile.TemporaryDirectory(prefix="pand-bench-")
    cached = CachedTeacherSource(_fake_cache(Path(tmp.name), n_images, views, teacher.embed_dim, 16)).to(device)

    def student():
        torch.manual_seed(0)
        return build_student(args.student, args.classes, pretrained=False)

    steps = {
        "student_only": _Step("ce", build_distiller({"name": "ce"}, student(), args.classes, None), None,
                              device, autocast, args.channels_last),
        # the same step with torch's default (unfused) AdamW: what the fused kernel saves
        "student_unfused": _Step("ce unfused", build_distiller({"name": "ce"}, student(), args.classes, None), None,
                                 device, autocast, args.channels_last, optim={"fused": False}),
        "online_teacher": _Step("vl2lite online", build_distiller({"name": "vl2lite"}, student(), args.classes, context),
                                live, device, autocast, args.channels_last),
        "cached_teacher": _Step("vl2lite cached", build_distiller({"name": "vl2lite"}, student(), args.classes, context),
                                cached, device, autocast, args.channels_last),
        "pand_cached": _Step("pand cached", build_distiller({"name": "pand"}, student(), args.classes, context),
                             cached, device, autocast, args.channels_last),
    }
    # The logit methods read the CLIP teacher's zero-shot logits, derived from the cached embeddings.
    cached_logits = ZeroShotLogits(cached, text, teacher.logit_scale).to(device)
    for method in ("kd", "dkd"):
        steps[f"{method}_cached"] = _Step(f"{method} cached", build_distiller({"name": method}, student(), args.classes,
                                                                             context), cached_logits, device,
                                          autocast, args.channels_last)
    g = torch.Generator().manual_seed(0)
    batches = []
    for s in range(args.steps + args.warmup):
        idx = torch.arange(s * args.batch, (s + 1) * args.batch) % n_images
        batches.append({
            "image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
            "label": torch.randint(0, args.classes, (args.batch,), generator=g),
            "index": idx, "view": idx % views,
        })
    times: dict[str, list[float]] = {k: [] for k in steps}
    teacher_ms: list[float] = []
    for i, batch in enumerate(batches):
        for key, step in steps.items():
            ms = step(batch)
            if i >= args.warmup:
                times[key].append(ms)
        # the one-time cost of a cache: the teacher forward of one batch of views
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad(), autocast():
            live({"image": batch["image"].to(device)}, {"image_embeds"})
        _sync(device)
        if i >= args.warmup:
            teacher_ms.append((time.perf_counter() - start) * 1000.0)
    tmp.cleanup()
    med = {k: statistics.median(v) for k, v in times.items()}
    result: dict[str, Any] = {
        "student_only_ms": round(med["student_only"], 2),
        "student_unfused_optimizer_ms": round(med["student_unfused"], 2),
        "online_teacher_ms": round(med["online_teacher"], 2),
        "cached_teacher_ms": round(med["cached_teacher"], 2),
        "pand_cached_ms": round(med["pand_cached"], 2),
        "ratio_online_vs_student": round(med["online_teacher"] / med["student_only"], 3),
        "ratio_cached_vs_student": round(med["cached_teacher"] / med["student_only"], 3),
        "ratio_pand_cached_vs_student": round(med["pand_cached"] / med["student_only"], 3),
        **{f"{m}_cached_ms": round(med[f"{m}_cached"], 2) for m in ("kd", "dkd")},
        **{f"ratio_{m}_cached_vs_student": round(med[f"{m}_cached"] / med["student_only"], 3) for m in ("kd", "dkd")},
        "teacher_forward_ms": round(statistics.median(teacher_ms), 2),
        "cache_build_ms_per_batch_per_view": round(statistics.median(teacher_ms), 2),
        "config": {**_config(args, device), "teacher_image_size": teacher.image_size},
    }
    return result


#: (row, method config, cacheable): the rows of ``--zoo``
ZOO_METHODS = (
    ("kd", {"name": "kd"}, True),
    ("kd_ls", {"name": "kd", "standardize": True, "temperature": 2.0, "kd_weight": 9.0}, True),
    ("dkd", {"name": "dkd"}, True),
    ("ofa", {"name": "ofa"}, True),
    ("nrkd", {"name": "nrkd"}, False),
    ("nrkd_response", {"name": "nrkd", "feature_weight": 0.0}, True),
    ("pat", {"name": "pat"}, False),
)


def _fake_logit_cache(folder: Path, n: int, views: int, classes: int) -> TeacherCache:
    """A complete cache of classifier logits of the benchmark's size (full float16 rows): the read path is timed."""
    rng = np.random.default_rng(0)
    meta = write_cache(folder, {"views": views, "seed": 0, "outputs": ["logits"], "num_classes": classes,
                                "logits_topk": None, "classes": [str(i) for i in range(classes)]},
                       {"params": np.zeros((n, views, 16), np.float32),
                        "logits": (3 * rng.standard_normal((n, views, classes))).astype(np.float16)})
    return TeacherCache(folder, meta)


def _zoo_bench(args: argparse.Namespace, device: torch.device, autocast) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_classifier(args.zoo_teacher, "auto", args.classes)
    teacher = ClassifierTeacher(model, num_classes=args.classes, image_size=None, mean=(0.5,) * 3, std=(0.25,) * 3,
                                identity={"kind": "classifier", "model": args.zoo_teacher}).to(device)
    live = LiveTeacherSource(teacher, teacher.mean, teacher.std)
    n_images, views = args.batch * args.steps, 2
    tmp = tempfile.TemporaryDirectory(prefix="pand-bench-zoo-")
    cached = CachedTeacherSource(_fake_logit_cache(Path(tmp.name), n_images, views, args.classes)).to(device)

    def student():
        torch.manual_seed(0)
        return build_student(args.student, args.classes, pretrained=False, image_size=args.image_size)

    def context(with_model: bool) -> TeacherContext:
        ctx = TeacherContext(identity=teacher.identity, num_classes=args.classes)
        add_stages(ctx, live, args.image_size, with_model=with_model)
        return ctx

    steps = {"student_only": _Step("ce", build_distiller({"name": "ce"}, student(), args.classes, None), None,
                                   device, autocast, args.channels_last)}
    for row, method, cacheable in ZOO_METHODS:
        with_model = method["name"] == "pat"
        steps[f"{row}_live"] = _Step(f"{row} live", build_distiller(method, student(), args.classes,
                                                                      context(with_model)),
                                     live, device, autocast, args.channels_last)
        if cacheable:
            steps[f"{row}_cached"] = _Step(f"{row} cached", build_distiller(method, student(), args.classes,
                                                                              context(False)),
                                           cached, device, autocast, args.channels_last)
    g = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(args.steps + args.warmup):
        idx = torch.arange(i * args.batch, (i + 1) * args.batch) % n_images
        batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
                 "label": torch.randint(0, args.classes, (args.batch,), generator=g), "index": idx,
                 "view": idx % views}
        for key, step in steps.items():
            ms = step(batch)
            if i >= args.warmup:
                times[key].append(ms)
    tmp.cleanup()
    base = statistics.median(times["student_only"])
    out: dict[str, Any] = {"teacher": args.zoo_teacher, "student_only_ms": round(base, 2)}
    for key, values in times.items():
        if key != "student_only":
            med = statistics.median(values)
            out[f"{key}_ms"] = round(med, 2)
            out[f"ratio_{key}_vs_student"] = round(med / base, 3)
    return out


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """The two products of attention, as torch counts them for the GPU kernels (``q k^T`` and ``p v``)."""
    b, h, s_q, d = query_shape
    return 2 * b * h * s_q * key_shape[-2] * (d + value_shape[-1])


def _forward_flops(fn, images: torch.Tensor) -> int:
    """Forward FLOPs of ``fn(images)`` as torch's counter sees them: matrix products, convolutions, attention."""
    from torch.utils.flop_counter import FlopCounterMode

    # torch's counter has formulas for the GPU attention kernels only; on CPU the fused kernel would count nothing.
    extra = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        extra[cpu_sdpa] = _sdpa_cpu_flops
    # nn.MultiheadAttention's inference fast path is one fused op without a formula, which would hide the
    # projections and attention of open_clip's blocks; the regular path runs the same products as countable ops.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False, custom_mapping=extra) as counter:
            fn(images)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


def _num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _latency_bench(args: argparse.Namespace, device: torch.device, autocast) -> dict[str, Any]:
    """Inference of the student and of the teacher's image tower: median ms per batch, images/s, params, FLOPs."""
    torch.manual_seed(0)
    student = build_student(args.student, args.classes, pretrained=False, image_size=args.image_size)
    student = student.to(device).eval()
    # Unlike in the training steps, the teacher gets its own input size (the one its weights are made for) unless
    # --teacher-image-size says otherwise: that is what running it on its own costs.
    teacher = load_clip_teacher(args.teacher, args.pretrained or RANDOM_WEIGHTS, device=str(device),
                                image_size=args.teacher_image_size)
    if args.channels_last:
        student.to(memory_format=torch.channels_last)
        teacher.model.to(memory_format=torch.channels_last)
    # role: (name, forward, input side, the modules the forward runs)
    models = {"student": (args.student, student, args.image_size, student),
              "teacher": (args.teacher, teacher.encode_images, teacher.image_size, teacher.model.visual)}
    batches = args.latency_batches
    g = torch.Generator().manual_seed(2)

    def images(n: int, side: int) -> torch.Tensor:
        x = torch.randn(n, 3, side, side, generator=g).to(device)
        return x.contiguous(memory_format=torch.channels_last) if args.channels_last else x

    inputs = {(role, b): images(b, side) for role, (_, _, side, _) in models.items() for b in batches}
    with torch.inference_mode():
        flops = {role: _forward_flops(fn, images(1, side)) for role, (_, fn, side, _) in models.items()}
        times: dict[tuple[str, int], list[float]] = {key: [] for key in inputs}
        # Round-robin over steps, batch sizes and models, so that drift of the machine affects every figure alike.
        for i in range(args.warmup + args.steps):
            for b in batches:
                for role, (_, fn, _, _) in models.items():
                    x = inputs[role, b]
                    _sync(device)
                    start = time.perf_counter()
                    with autocast():
                        fn(x)
                    _sync(device)
                    if i >= args.warmup:
                        times[role, b].append((time.perf_counter() - start) * 1000.0)
    med = {key: statistics.median(v) for key, v in times.items()}
    out: dict[str, Any] = {"batches": batches, "steps": args.steps, "warmup": args.warmup}
    for role, (name, _, side, timed) in models.items():
        out[role] = {
            "name": name, "image_size": side, "params": _num_params(timed),
            "flops_per_image": flops[role], "gflops_per_image": round(flops[role] / 1e9, 4),
            "per_batch": {str(b): {"ms": round(med[role, b], 3), "images_per_s": round(b * 1000.0 / med[role, b], 1)}
                          for b in batches},
        }
    # What a student replaces at inference is the image tower; the text tower runs once per class list.
    out["teacher"]["params_with_text_tower"] = _num_params(teacher.model)
    out["ratio_teacher_vs_student"] = {str(b): round(med["teacher", b] / med["student", b], 3) for b in batches}
    if args.exported and device.type == "cpu":
        if importlib.util.find_spec("onnxruntime") is None:
            out["exported"] = {"skipped": "onnxruntime is not installed: pip install pand[export]"}
        else:
            out["exported"] = exported_rows(student, args.image_size, threads=torch.get_num_threads(),
                                            batches=batches, repeats=args.steps, warmup=args.warmup)
    return out


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _student_step_ms(args: argparse.Namespace, device: torch.device, autocast) -> float:
    """Median ms of the student's own training step (cross-entropy), for ``--loader`` when no training table ran."""
    step = _student_step(args.student, args.classes, None, device, autocast, args.channels_last)
    g = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.steps):
        batch = {"image": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
                 "label": torch.randint(0, args.classes, (args.batch,), generator=g)}
        ms = step(batch)
        if i >= args.warmup:
            times.append(ms)
    return statistics.median(times)


def _student_step(student: str, classes: int, image_size: int | None, device: torch.device, autocast,
                  channels_last: bool) -> _Step:
    """The student's own training step (cross-entropy, no teacher), seeded."""
    torch.manual_seed(0)
    model = build_student(student, classes, pretrained=False, image_size=image_size)
    return _Step("ce", build_distiller({"name": "ce"}, model, classes, None), None, device, autocast, channels_last)


def student_throughput(student: str, classes: int, image_size: int, batch: int, steps: int, warmup: int) -> float:
    """Images/s of the student's own training step on the CPU over ``steps`` steps after ``warmup`` (wall clock, with
    the threads this process has): the unit of ``--parallel``, run in one process or in several side by side."""
    step = _student_step(student, classes, image_size, torch.device("cpu"), nullcontext, False)
    g = torch.Generator().manual_seed(0)
    batches = [{"image": torch.randn(batch, 3, image_size, image_size, generator=g),
                "label": torch.randint(0, classes, (batch,), generator=g)} for _ in range(2)]
    for i in range(warmup):
        step(batches[i % 2])
    start = time.perf_counter()
    for i in range(steps):
        step(batches[i % 2])
    return steps * batch / (time.perf_counter() - start)


def _parallel_bench(args: argparse.Namespace) -> dict[str, Any]:
    """The student's training images/s on this CPU: one process with every core's threads, against one process per
    core (``pand quickstart --jobs``, ``pand sweep --jobs``) running the same step side by side."""
    cores = available_cores()
    workers = default_workers(cores, cores)
    spec = (args.student, args.classes, args.image_size, args.batch, 2 * args.steps, args.warmup)
    threads = torch.get_num_threads()
    torch.set_num_threads(cores)
    try:
        (alone,) = run_jobs([Job("one process", student_throughput, spec)], 1, printer=lambda line: None)
    finally:
        torch.set_num_threads(threads)
    side = run_jobs([Job(f"process {i}", student_throughput, spec) for i in range(workers)], workers, cores=cores,
                    printer=lambda line: None)
    together = sum(d.result for d in side)
    return {"cores": cores, "workers": workers, "threads_per_worker": max(1, cores // workers),
            "one_process_img_per_s": round(alone.result, 1), "side_by_side_img_per_s": round(together, 1),
            "per_worker_img_per_s": [round(d.result, 1) for d in side], "speedup": round(together / alone.result, 2)}


def _loader_bench(args: argparse.Namespace, device: torch.device, student_ms: float) -> dict[str, Any]:
    """Loader images/s on each path (views made per image in the loader, or per batch on the device), JPEG and
    decoded cache, next to the student's training images/s at the same size and batch, and which one limits a run."""

    loader = measure_loader_throughput(num_images=args.loader_images, workers=(0, args.loader_workers),
                                       batch_size=args.batch, image_size=args.image_size, device=device)
    student = round(args.batch * 1000.0 / student_ms, 1)
    return {**loader, "student_train_img_per_s": student, "estimates": run_estimates(loader, student)}


def print_result(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    c = result["config"]
    console = Console()
    if "student_only_ms" in result:
        table = Table(title=f"pand bench: {c['student']} student, {c['teacher']} teacher, {c['image_size']} px, "
                            f"batch {c['batch']}, {c['device']} ({c['threads']} threads, {c['precision']})")
        table.add_column("training step")
        table.add_column("ms / step", justify="right")
        table.add_column("x student alone", justify="right")
        base = result["student_only_ms"]
        for key, label in (("student_only_ms", "student alone (ce)"),
                           ("student_unfused_optimizer_ms", "student alone, unfused AdamW"),
                           ("online_teacher_ms", "VL2Lite, online teacher"),
                           ("cached_teacher_ms", "VL2Lite, teacher cache"), ("pand_cached_ms", "PAND, teacher cache"),
                           ("kd_cached_ms", "KD, teacher cache"), ("dkd_cached_ms", "DKD, teacher cache")):
            table.add_row(label, f"{result[key]:.1f}", f"{result[key] / base:.2f}")
        console.print(table)
        console.print(f"teacher forward (cache build cost per batch and view): {result['teacher_forward_ms']:.1f} ms")
    if "latency" in result:
        _print_latency(console, result["latency"], c)
    if "zoo" in result:
        zoo = result["zoo"]
        t = Table(title=f"pand bench --zoo: {c['student']} student, {zoo['teacher']} classifier teacher (random "
                        f"weights), {c['image_size']} px, batch {c['batch']}")
        t.add_column("method")
        for col in ("live ms", "x student", "cached ms", "x student"):
            t.add_column(col, justify="right")
        t.add_row("student alone (ce)", f"{zoo['student_only_ms']:.1f}", "1.00", "", "")
        for row, _, _ in ZOO_METHODS:
            live_ms, cached_ms = zoo.get(f"{row}_live_ms"), zoo.get(f"{row}_cached_ms")
            t.add_row(row + (" (teacher runs twice)" if row == "pat" else ""), f"{live_ms:.1f}",
                      f"{live_ms / zoo['student_only_ms']:.2f}",
                      "no cache" if cached_ms is None else f"{cached_ms:.1f}",
                      "" if cached_ms is None else f"{cached_ms / zoo['student_only_ms']:.2f}")
        console.print(t)
    if "loader" in result:
        _print_loader(console, result["loader"], c)
    if "parallel" in result:
        _print_parallel(console, result["parallel"], c)


def _print_parallel(console, par: dict[str, Any], c: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"pand bench --parallel: {c['student']} training steps (ce), {c['image_size']} px, batch "
                    f"{c['batch']}, {par['cores']} CPU cores")
    for col in ("runs", "images/s", "x one process"):
        t.add_column(col, justify="left" if col == "runs" else "right")
    t.add_row(f"one process, {par['cores']} threads", f"{par['one_process_img_per_s']:.1f}", "1.00")
    t.add_row(f"{par['workers']} processes side by side, {par['threads_per_worker']} thread(s) each",
              f"{par['side_by_side_img_per_s']:.1f}", f"{par['speedup']:.2f}")
    console.print(t)


def _print_latency(console, lat: dict[str, Any], c: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"pand bench --latency: inference, random weights, median of {lat['steps']} batches, "
                    f"{c['device']} ({c['threads']} threads, {c['precision']})")
    for col in ("model", "px", "params (M)", "GFLOPs / image"):
        t.add_column(col, justify="left" if col == "model" else "right")
    for b in lat["batches"]:
        t.add_column(f"ms, batch {b}", justify="right")
        t.add_column(f"images/s, batch {b}", justify="right")
    student, teacher = lat["student"], lat["teacher"]
    for role, m in (("student", student), ("teacher", teacher)):
        cells = []
        for b in lat["batches"]:
            row = m["per_batch"][str(b)]
            cells += [f"{row['ms']:.2f}", f"{row['images_per_s']:.1f}"]
        t.add_row(f"{role}: {m['name']}", str(m["image_size"]), f"{m['params'] / 1e6:.3g}",
                  f"{m['flops_per_image'] / 1e9:.3g}", *cells)
    ratios = []
    for b in lat["batches"]:
        ratios += [f"{lat['ratio_teacher_vs_student'][str(b)]:.2f}x", ""]
    t.add_row("teacher / student", "", f"{teacher['params'] / student['params']:.2f}x",
              f"{teacher['flops_per_image'] / max(student['flops_per_image'], 1):.2f}x", *ratios)
    console.print(t)
    console.print(f"teacher parameters: {teacher['params'] / 1e6:.3g} M in the image tower (timed), "
                  f"{teacher['params_with_text_tower'] / 1e6:.3g} M with the text tower")
    if "exported" in lat:
        _print_exported(console, lat["exported"], student["name"])


def _print_exported(console, ex: dict[str, Any], name: str) -> None:
    from rich.table import Table

    if "skipped" in ex:
        console.print(f"exported student rows skipped: {ex['skipped']}")
        return
    t = Table(title=f"the student as it ships ({name}, random weights): median of {ex['repeats']} batches, "
                    f"{ex['threads']} threads; instruction sets: {', '.join(ex['isa']) or 'none of note'}")
    t.add_column("model", justify="left")
    t.add_column("MB on disk", justify="right")
    for b in ex["batches"]:
        t.add_column(f"ms, batch {b}", justify="right")
        t.add_column(f"vs PyTorch, batch {b}", justify="right")
    for model, m in ex["models"].items():
        cells = []
        for b in ex["batches"]:
            cells += [f"{m['ms'][str(b)]:.3f}", f"{m['speedup'][str(b)]:.2f}x"]
        t.add_row(model, f"{m['megabytes']:.2f}", *cells)
    console.print(t)
    share = ex["int8"]["int8_mac_share"]
    left = ", ".join(f"{op} x{len(v)}" for op, v in ex["int8"]["float_operators"].items())
    console.print(f"int8: {100 * share:.0f} % of Conv / Gemm / MatMul operators run in int8" if share is not None
                  else "int8: no Conv / Gemm / MatMul operator", f"; left in float: {left}" if left else "", sep="")


def _print_loader(console, loader: dict[str, Any], c: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=f"pand bench --loader: {loader['images']} JPEGs {loader['image_hw'][0]}x{loader['image_hw'][1]} -> "
                    f"{loader['image_size']} px views (resize {loader['resize_size']}), batch {loader['batch_size']}, "
                    f"{loader['cpu_count']} CPUs; decoded cache built in {loader['build_cache_s']} s")
    for col in ("what the loader does", "workers", "JPEG images/s", "JPEG in tar shards images/s",
                "decoded cache images/s"):
        t.add_column(col, justify="left" if col.startswith("what") else "right")
    what = {"load": "load only (decode + resize, or cache read)", "augment": "full view per image (augment_on=cpu)",
            "device": "load + crop window (augment_on=device)"}
    for row in loader["rows"]:
        t.add_row(what[row["mode"]], str(row["workers"]), f"{row['jpeg_img_per_s']:.1f}",
                  f"{row['shard_img_per_s']:.1f}", f"{row['cache_img_per_s']:.1f}")
    console.print(t)
    shards = loader["shards"]
    n = shards["shards"]
    s = Table(title=f"the same JPEGs from a folder and from {n} tar shard{'s' if n > 1 else ''} (read by index): "
                    "images/s per core")
    for col in ("what the loader does", "cores", "folder", "tar shards", "shards / folder"):
        s.add_column(col, justify="left" if col.startswith("what") else "right")
    for row in shards["rows"]:
        s.add_row(what[row["mode"]], str(row["cores"]), f"{row['folder_img_per_s_per_core']:.1f}",
                  f"{row['shard_img_per_s_per_core']:.1f}", f"{row['shard_vs_folder']:.2f}")
    console.print(s)
    share = loader.get("device_augment")
    if share:
        console.print(f"device's share of augment_on=device (copy + batched views on {share['device']}): "
                      f"{share['img_per_s']:.1f} images/s ({share['ms_per_batch']:.1f} ms per batch)")
    console.print(f"student training step ({c['student']}, {loader['image_size']} px, batch {c['batch']}, "
                  f"{c['precision']}): {loader['student_train_img_per_s']:.1f} images/s")
    e = Table(title="estimated run speed: the slower of the loader and the device side")
    for col in ("augment_on", "source", "workers", "loader images/s", "device side images/s", "run images/s",
                "limited by"):
        e.add_column(col, justify="right" if "images" in col or col == "workers" else "left")
    for row in loader["estimates"]:
        e.add_row(row["augment_on"], row["source"], str(row["workers"]), f"{row['loader_img_per_s']:.1f}",
                  f"{row['device_side_img_per_s']:.1f}", f"{row['run_img_per_s']:.1f}", row["limited_by"])
    console.print(e)
