"""Hyper-parameter sweeps (Hydra multirun syntax) run one after another, and a table + plot of a set of run folders.

    pand sweep optim.lr=1e-3,3e-3 method.nlrd.weight=0,0.05,0.1 [--sweep-dir DIR]
    pand gather RUN_DIR... --out DIR [--x KEY]

A sweep folder holds one run folder per combination (``<i>-<swept values>``) and ``results.csv``, ``results.md`` and,
when one numeric key was swept, ``results.png``. A run that fails with a pand error leaves ``error.json`` in its folder
instead of ``summary.json``; the sweep goes on and the table lists the failure.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import logging
import math
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from pand.arguments import ArgumentParser
from pand.errors import ConfigError, PandError
from pand.io import atomic_write_bytes, atomic_write_json, atomic_write_text, check_writable, read_json
from pand.jobs import Job, run_jobs
from pand.spreadsheet import spreadsheet_cell

log = logging.getLogger("pand.sweep")

# Keys that differ between runs without being an experimental variable.
_IGNORED_KEYS = ("run_dir", "ckpt_path")
_IGNORED_PREFIXES = ("paths.",)
SUMMARY_COLUMNS = ("val_acc1", "test_acc1", "epochs", "train_seconds")
ERROR_FILE = "error.json"


# --------------------------------------------------------------------------------------------------------- expansion
def _parse(overrides: Sequence[str]):
    from pand.config import parse_overrides

    return parse_overrides(list(overrides))


def _sweep_axes(overrides: Sequence[str]) -> list[tuple[str | None, list[str]]]:
    """Per override: (swept key or None, the override strings it expands into)."""
    axes: list[tuple[str | None, list[str]]] = []
    for override in _parse(overrides):
        if not override.is_sweep_override():
            axes.append((None, [override.input_line]))
            continue
        if not override.is_discrete_sweep():
            raise ConfigError(
                f"cannot expand {override.input_line!r}: only discrete sweeps (a,b,c / choice(...) / range(...)) "
                "are supported"
            )
        key = override.get_key_element()
        try:
            values = list(override.sweep_string_iterator())
        except Exception as err:  # noqa: BLE001 - glob() needs a config loader; Hydra raises assorted types
            raise ConfigError(f"cannot expand {override.input_line!r}: {err}") from err
        if not values:
            raise ConfigError(f"sweep {override.input_line!r} has no values")
        axes.append((key, [f"{key}={v}" for v in values]))
    return axes


def expand_sweep(overrides: list[str]) -> list[list[str]]:
    """Hydra multirun expansion: one override list per combination of the swept values (cartesian product).

    ``["a=1,2", "b=range(0,3)", "c=x"]`` gives six lists such as ``["a=1", "b=0", "c=x"]``; values are parsed by
    Hydra's own grammar, so commas inside quotes or brackets do not split a value.
    """
    axes = _sweep_axes(overrides)
    return [list(combo) for combo in itertools.product(*(values for _, values in axes))]


def _swept_keys(overrides: Sequence[str]) -> list[str]:
    return [key for key, _ in _sweep_axes(overrides) if key is not None]


def _slug(text: str, limit: int = 80) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")[:limit]


def _short_name(combo: Sequence[str], swept: Sequence[str]) -> str:
    """``lr_0.001-weight_0.05`` for the swept keys of a combination (last key component and value)."""
    parts = []
    for override in _parse(combo):
        key = override.get_key_element()
        if key in swept:
            value = override.get_value_element_as_str().strip("'\"")
            parts.append(_slug(f"{key.split('.')[-1].lstrip('+~')}_{value}", 40))
    return "-".join(p for p in parts if p)


# --------------------------------------------------------------------------------------------------------------- run
def _quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _check_every_combination(combos: Sequence[Sequence[str]]) -> list[dict[str, Any]]:
    """Compose and check the settings of every run before the first one starts, so that a typo or a value out of range
    in one combination is refused in a second instead of failing that run hours into the sweep; returns the composed
    configs, in the order of ``combos``."""
    from pand.config import compose, to_plain
    from pand.engine.config_checks import validate_train_settings

    problems: dict[str, list[str]] = {}
    configs = []
    for combo in combos:
        try:
            configs.append(to_plain(compose("train", combo)))
            validate_train_settings(configs[-1])
        except PandError as err:
            problems.setdefault(str(err), []).append(" ".join(combo))
    if problems:
        raise ConfigError("the sweep was not started; " + "\n".join(
            f"{message} (in {len(runs)} of {len(combos)} run(s), e.g. {runs[0]})"
            for message, runs in problems.items()))
    return configs


def run_sweep(overrides: list[str], sweep_dir: str | None = None, jobs: int = 1) -> list[dict]:
    """Train every combination of the swept overrides (``jobs`` at a time, each in its own process when more than
    one: see :mod:`pand.jobs`), then tabulate and plot them in ``sweep_dir``.

    Returns one dict per combination: the run summary (plus ``overrides`` and ``status``) or, for a run that raised a
    pand error, ``{"run_dir", "overrides", "status": "failed", "error"}``.
    """
    user = list(overrides)
    dropped = [o for o in user if o.lstrip("+~").split("=", 1)[0] == "run_dir"]
    if dropped:
        log.warning("ignoring %s: every sweep run gets its own folder under the sweep folder", ", ".join(dropped))
        user = [o for o in user if o not in dropped]
    combos = expand_sweep(user)
    swept = _swept_keys(user)
    configs = _check_every_combination(combos)
    if sweep_dir is None:
        runs_dir = configs[0]["paths"]["runs_dir"]
        sweep_path = Path(runs_dir) / f"sweep-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
    else:
        sweep_path = Path(sweep_dir)
    sweep_path = sweep_path.resolve()
    sweep_path.mkdir(parents=True, exist_ok=True)
    log.info("sweep of %d run(s) over %s in %s", len(combos), ", ".join(swept) or "(nothing swept)", sweep_path)

    run_dirs: list[Path] = []
    todo: list[Job] = []
    for i, combo in enumerate(combos):
        short = _short_name(combo, swept)
        run_dir = sweep_path / (f"{i}-{short}" if short else str(i))
        run_dirs.append(run_dir)
        todo.append(Job(name=f"sweep run {i + 1}/{len(combos)}", fn=_sweep_run, args=(combo, str(run_dir)),
                        log=run_dir.with_name(run_dir.name + ".log") if jobs > 1 else None))
    if jobs <= 1:
        for job in todo:
            log.info("%s: %s", job.name, " ".join(job.args[0]))
    gpus = _gpu_per_run([c["trainer"] for c in configs], jobs) if jobs > 1 else None
    done = run_jobs(todo, jobs, describe=lambda job, r: r["status"], printer=log.info, gpus=gpus)
    results = [d.result for d in done]
    gather_runs(run_dirs, sweep_path)
    return results


def _gpu_per_run(trainers: Sequence[Mapping[str, Any]], jobs: int) -> list[str] | None:
    """For ``--jobs N`` runs on GPUs (``trainers``: the runs' ``trainer`` sections): one GPU per side-by-side run
    (``None`` when the runs use the CPU). Refused when there are fewer GPUs than runs side by side, or when a run uses
    several devices itself (it starts its own processes: run those one at a time)."""
    accelerators = {str(t.get("accelerator", "auto")).lower() for t in trainers}
    if accelerators <= {"cpu"}:
        return None
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:  # auto means the CPU here; a run that asks for a GPU is refused by the run itself, with the reason
        return None
    several = [t.get("devices") for t in trainers if str(t.get("devices", 1)) not in ("1", "[0]")]
    if several:
        raise ConfigError(f"--jobs {jobs}: these runs use trainer.devices={several[0]} each and start their own "
                          "processes; run them one at a time (--jobs 1)")
    if count < jobs:
        raise ConfigError(f"--jobs {jobs} runs side by side would share this machine's {count} GPU(s); give --jobs "
                          f"{count} or fewer (each run gets a GPU of its own), or trainer=cpu")
    # ids as this process sees them, mapped back through a CUDA_VISIBLE_DEVICES it was given
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return visible[:count] if len(visible) >= count else [str(i) for i in range(count)]


def _sweep_run(combo: list[str], run_dir: str) -> dict[str, Any]:
    """One run of a sweep; a pand error is the run's result (the sweep goes on), recorded beside it."""
    from pand.config import compose, to_plain
    from pand.engine.run import train

    config = None
    try:
        config = to_plain(compose("train", [*combo, f"run_dir={_quote(run_dir)}"]))
        config["run_dir"] = run_dir
        return {**train(config), "overrides": combo, "status": "ok"}
    except PandError as err:
        log.error("run %s failed: %s", run_dir, err)
        record = {"run_dir": run_dir, "overrides": combo, "status": "failed", "error": f"{type(err).__name__}: {err}"}
        atomic_write_json(Path(run_dir) / ERROR_FILE, {**record, "config": config})
        return record


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        flat: dict[str, Any] = {}
        for key, value in tree.items():
            flat.update(_flatten(value, f"{prefix}{key}."))
        if not tree and prefix:
            flat[prefix[:-1]] = {}
        return flat
    return {prefix[:-1]: tree}


def _ignored(key: str) -> bool:
    return key in _IGNORED_KEYS or key.startswith(_IGNORED_PREFIXES)


def _canon(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _cell(value: Any) -> Any:
    if isinstance(value, (list, dict)):
        return _canon(value)
    return "" if value is None else value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _load_yaml(path: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]
    except Exception as err:  # noqa: BLE001 - yaml and OmegaConf raise several types for a damaged file
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise PandError(f"run config {path} is not readable YAML ({first}); it is damaged or was cut short") from None


def _read_run(run_dir: Path) -> dict[str, Any] | None:
    """``{"run_dir", "config", "summary", "error"}`` of a run folder, or None (with a warning) if it is not a run."""
    summary_path, error_path, config_path = run_dir / "summary.json", run_dir / ERROR_FILE, run_dir / "config.yaml"
    config: dict[str, Any] | None = _load_yaml(config_path) if config_path.is_file() else None
    if summary_path.is_file():
        if config is None:
            log.warning("%s has summary.json but no config.yaml; its settings are unknown", run_dir)
        return {"run_dir": run_dir, "config": config or {}, "summary": read_json(summary_path, "run summary"),
                "error": None}
    if error_path.is_file():
        record = read_json(error_path, "run error record")
        if config is None:
            config = record.get("config")
        if config is None:  # the config itself failed to compose: fall back on the override values
            config = {}
            for override in record.get("overrides", []):
                key, _, value = override.partition("=")
                config[key.lstrip("+~")] = value
            return {"run_dir": run_dir, "config": None, "flat": config, "summary": {}, "error": record.get("error")}
        return {"run_dir": run_dir, "config": config, "summary": {}, "error": record.get("error") or "failed"}
    log.warning("skipping %s: no summary.json (the run did not finish or is not a pand run folder)", run_dir)
    return None


def _differing_keys(flats: Sequence[Mapping[str, Any]]) -> list[str]:
    keys: list[str] = []
    for flat in flats:
        keys.extend(k for k in flat if k not in keys)
    return [k for k in keys if not _ignored(k) and len({_canon(f[k]) if k in f else "<missing>" for f in flats}) > 1]


def _percent(value: Any) -> str:
    return f"{100 * value:.2f}" if _is_number(value) else ""


def _markdown(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    header = ["run", *keys, *SUMMARY_COLUMNS, "status"]

    def fmt(row: Mapping[str, Any], col: str) -> str:
        value = row.get(col)
        if col in ("val_acc1", "test_acc1"):
            text = _percent(value)
        elif col == "train_seconds" and _is_number(value):
            text = f"{value:.1f}"
        elif col == "status" and row.get("error"):
            error = str(row["error"])
            text = f"failed: {error[:97] + '...' if len(error) > 100 else error}"
        else:
            text = str(_cell(value))
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "Top-1 accuracy in % (val: best epoch, test: the best-on-val checkpoint).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if c in ("run", "status") or c in keys else "---:" for c in header) + "|",
    ]
    lines += ["| " + " | ".join(fmt(row, c) for c in header) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _csv(rows: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> str:
    columns = ["run", "run_dir", *keys, *SUMMARY_COLUMNS, "test_acc5", "status", "error"]
    buffer = io.StringIO()
    # csv's own line ending (\r\n), as in pand's other CSVs: with "\n" a cell holding a carriage return went unquoted
    # and split its row in two
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        # config values and error messages are text the user chose: none may run as a spreadsheet formula
        writer.writerow({c: spreadsheet_cell(_cell(row.get(c))) for c in columns})
    return buffer.getvalue()


def save_figure(fig, path: Path, dpi: int = 150) -> Path:
    """Save a matplotlib figure as PNG atomically (readers never see a half-written image)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)  # render with Agg whatever pyplot's backend is: no display needed
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return atomic_write_bytes(path, buf.getvalue())


def _plot(rows: Sequence[Mapping[str, Any]], x: str, others: Sequence[str], path: Path) -> Path | None:
    from matplotlib.figure import Figure

    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for row in rows:
        if _is_number(row.get(x)):
            groups.setdefault(tuple(_canon(row.get(k)) for k in others), []).append(row)
    if not groups:
        log.warning("no run has a numeric value for %s; results.png not written", x)
        return None
    fig = Figure(figsize=(6.4, 4.4))
    ax = fig.add_subplot()
    plotted = False
    for group, members in groups.items():
        members = sorted(members, key=lambda r: r[x])
        suffix = ""
        if others:
            suffix = " (" + ", ".join(f"{k}={json.loads(v)}" for k, v in zip(others, group)) + ")"
        for split, marker, style in (("test", "o", "-"), ("val", "s", "--")):
            points = [(r[x], 100 * r[f"{split}_acc1"]) for r in members if _is_number(r.get(f"{split}_acc1"))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker=marker, linestyle=style, label=f"{split} top-1{suffix}")
                plotted = True
    if not plotted:
        log.warning("no finished run has an accuracy to plot; results.png not written")
        return None
    values = sorted({r[x] for m in groups.values() for r in m})
    if len(values) > 2 and all(v > 0 for v in values) and values[-1] / values[0] >= 10:
        ax.set_xscale("log")
    if len(values) <= 12:  # tick exactly the swept values, printed compactly (1e-3, not 0.001000)
        ax.set_xticks(values, labels=[f"{v:g}" for v in values])
        ax.minorticks_off()
    ax.set_xlabel(x)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(f"accuracy vs {x}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def gather_runs(run_dirs: list[Path], out_dir: Path, x: str | None = None) -> list[dict]:
    """Tabulate run folders into ``out_dir``: ``results.csv``, ``results.md`` and (one numeric swept key) ``results.png``.

    The columns are the config keys (dotted) whose values differ between the runs, ignoring ``run_dir``, ``paths.*``
    and ``ckpt_path``, then the summary's accuracies, epochs and training time. Folders without ``summary.json`` are
    skipped with a warning (a failed sweep run, which has ``error.json``, is listed as failed). ``x`` names the key to
    plot against; without it a plot is drawn when exactly one key differs and it is numeric. Returns the table rows.
    """
    out_dir = Path(out_dir)
    runs = [r for r in (_read_run(Path(d)) for d in run_dirs) if r is not None]
    if not runs:
        raise ConfigError(f"no run folder with summary.json among {', '.join(str(d) for d in run_dirs) or '(none)'}")
    flats = [r.get("flat") or _flatten(r["config"] or {}) for r in runs]
    # A run whose config failed to compose only knows its overrides: it takes no part in finding the differing keys.
    keys = _differing_keys([f for f, r in zip(flats, runs) if r["config"] is not None] or flats)
    if x is not None and x not in keys:
        if not any(x in f for f in flats):
            raise ConfigError(f"--x {x!r} is not a config key of these runs; swept keys: {', '.join(keys) or 'none'}")
        keys.append(x)

    rows: list[dict] = []
    for run, flat in zip(runs, flats):
        summary = run["summary"]
        row: dict[str, Any] = {"run": run["run_dir"].name, "run_dir": str(run["run_dir"])}
        row.update({k: flat.get(k) for k in keys})
        for col in (*SUMMARY_COLUMNS, "test_acc5"):
            row[col] = summary.get(col)
        row["status"] = "failed" if run["error"] else "ok"
        row["error"] = run["error"] or ""
        rows.append(row)

    atomic_write_text(out_dir / "results.csv", _csv(rows, keys))
    atomic_write_text(out_dir / "results.md", _markdown(rows, keys))
    if x is None:
        numeric = [k for k in keys if all(_is_number(r.get(k)) for r in rows if r["status"] == "ok")
                   and any(_is_number(r.get(k)) for r in rows)]
        if len(keys) == 1 and numeric:
            x = numeric[0]
        elif numeric:
            log.info("several keys differ (%s); pass x=KEY (--x) to plot against one; results.png not written",
                     ", ".join(keys))
    if x is not None:
        _plot(rows, x, [k for k in keys if k != x], out_dir / "results.png")
    log.info("gathered %d run(s) into %s", len(rows), out_dir)
    return rows


# --------------------------------------------------------------------------------------------------------------- CLI
def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def expand_run_dirs(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """Run folders from arguments that are run folders or parents of run folders (their subfolders, natural order)."""
    run_dirs: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ConfigError(f"{p} is not a folder")
        if any((p / name).is_file() for name in ("summary.json", ERROR_FILE, "config.yaml")):
            run_dirs.append(p)
        else:
            subs = sorted((s for s in p.iterdir() if s.is_dir() and not s.name.startswith(".")), key=_natural_key)
            if not subs:
                raise ConfigError(f"{p} is neither a run folder (no summary.json) nor a folder of run folders")
            run_dirs.extend(subs)
    return run_dirs


def main_sweep(args: list[str]) -> int:
    """``pand sweep OVERRIDE... [--sweep-dir DIR]``: exit status 0 if every run finished, 1 if one failed."""
    parser = ArgumentParser(
        prog="pand sweep",
        description="Train every combination of swept Hydra overrides (one run after another, or --jobs N at a\n"
                    "time), then write results.csv, results.md and (one numeric swept key) results.png into\n"
                    "the sweep folder.\n"
                    "A run that fails is listed as failed and the sweep goes on (exit status 1).",
        epilog="example: pand sweep data=cub method=vl2lite 'optim.lr=1e-3,3e-3' 'seed=range(0,3)'\n"
               "Sweep syntax as in Hydra multirun: a,b,c  choice(a,b)  range(start,stop[,step]);\nquote values that "
               "contain commas: 'x=\"a,b\",c'.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides of the train config")
    parser.add_argument("--sweep-dir", default=None, metavar="DIR",
                        help="folder for the runs and the results (default: <paths.runs_dir>/sweep-<time>)")
    parser.add_argument("--jobs", type=int, default=1, metavar="N",
                        help="runs side by side, each in its own process with cores/N threads and its output in "
                             "<run folder>.log (default 1: one after another; for small CPU runs, N = cores pays)")
    ns = parser.parse_intermixed_args(args)
    if ns.jobs < 1:
        parser.error(f"--jobs={ns.jobs} is not allowed: expected an integer >= 1")
    results = run_sweep(ns.overrides, ns.sweep_dir, jobs=ns.jobs)
    sweep_dir = Path(results[0]["run_dir"]).parent if results else None
    if sweep_dir is not None and (sweep_dir / "results.md").is_file():
        print((sweep_dir / "results.md").read_text())
        print(f"results in {sweep_dir}")
    failed = [r for r in results if r.get("status") == "failed"]
    for r in failed:
        print(f"failed: {' '.join(r['overrides'])}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def main_gather(args: list[str]) -> int:
    """``pand gather RUN_DIR... --out DIR [--x KEY]``."""
    parser = ArgumentParser(
        prog="pand gather",
        description="Tabulate finished runs: results.csv, results.md and, when one numeric config key differs "
                    "between the runs (or --x names it), results.png (val and test top-1 vs that key).",
    )
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="a run folder (with summary.json and config.yaml) or a folder whose subfolders are runs")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to write the results into")
    parser.add_argument("--x", default=None, metavar="KEY", help="dotted config key for the plot's x axis")
    ns = parser.parse_args(args)
    check_writable(ns.out, "the output folder (--out)")
    rows = gather_runs(expand_run_dirs(ns.run_dirs), Path(ns.out), x=ns.x)
    print((Path(ns.out) / "results.md").read_text())
    print(f"{len(rows)} run(s); results in {ns.out}")
    return 0
