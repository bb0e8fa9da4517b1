"""The README and docs/*.md run: every command they show is executed on tiny fixtures, so the docs cannot rot.

What is read. Every fenced ``bash`` / ``sh`` / ``shell`` / ``console`` block of README.md and docs/*.md (in a
``console`` block only the ``$ `` lines); lines ending in ``\\`` are joined, comments dropped (``#`` outside quotes).
Every ``python`` block is executed too. Output goes in ``text`` / ``json`` blocks, which are not read.

What runs. Each page runs in its own empty working directory, its commands in the order shown, so a command may use
what an earlier one on the page wrote (``run_dir=runs/cub-vl2lite``, then ``ckpt_path=runs/cub-vl2lite/...``):
- ``pand ...`` goes through ``pand.cli.main`` in-process, after the rules of :func:`tiny_argv`: real CLIP teachers
  (``convnext_xxlarge``, ``vit_b16``, ``vit_l14``, or one an experiment names) become the random ``pand-tiny-vit``
  (``teacher=tiny``), GPUs and DDP become one CPU process, a dataset becomes its tiny fixture in the official layout
  (``tests/fixtures/datasets.py``: 3-10 classes, a few 32 px images), and sizes shrink (1 epoch, 32 px, batches of 4,
  2 cached views, 1 CoOp epoch, 3 labelled images per class, 12 unlabelled ones, 2 values per swept key, no
  pretrained student weights). The fixed paths of the docs (``/path/to/my_images``, ``/data/coco``, ...) map to
  fixtures (``PATHS``). A train command that resumes (``ckpt_path=``) trains a second epoch.
- ``pand ... | jq .KEY`` runs the pand part and checks that stdout is JSON holding KEY.
- ``python -c CODE`` and the ``python`` blocks run with ``exec`` in the page's directory, after the text
  substitutions of ``PYTHON_RULES`` (the real teacher and data folder become the tiny ones).
- A path the docs read that no earlier command of the page wrote comes from ``PREREQUISITES`` (the demo's students
  under ``runs/quickstart/``, a reduced ``pand quickstart`` built once; ``photos/``; stage 1's learned prompts).

Shapes. The README repeats commands of docs/, and a page often shows one command in several spellings. A
training-type command (train, sweep, features, prompts, cache build) whose shape already ran, on an earlier page or
earlier on its own, is only composed and validated, unless a later running command of its page reads what it writes
or it pipes into jq. A shape is the subcommand, the composed dataset, teacher, student and method, and the other keys
it sets but the operational ones (``OPERATIONAL``: where it reads and writes, sizes, devices, the optimiser). Every
training-type command, run or not, is composed as written (``pand config``-style: Hydra and pand's setting checks, no
training), so a misspelt key or value fails even where the tiny run would replace it.

What does not run. ``EXCLUDED`` lists, with the reason, the commands that cannot run here (installs, the full demo,
several processes); the test fails on a command that is neither run nor excluded, and on an exclusion that matches
nothing. The module also checks that the README stays a map (at most 250 lines, the quickstart table between its
markers) and that every relative link and anchor in README.md, docs/*.md, benchmarks/README.md and CONTRIBUTING.md
resolves.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pand.cli import main
from pand.config import compose, to_plain
from pand.data.fashion_mnist import CLASSES as FASHION_MNIST_CLASSES
from pand.engine.config_checks import validate_train_settings
from tests.engine.conftest import tiny_overrides
from tests.fixtures.datasets import (
    fashion_mnist_arrays,
    make_captions,
    make_cifar100,
    make_cub,
    make_fashion_mnist,
    make_imagefolder,
    make_imagenet,
    make_shards,
    write_image,
)

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.glob("*.md"))]
LINKED = [*PAGES, ROOT / "benchmarks" / "README.md", ROOT / "CONTRIBUTING.md"]
README_MAX_LINES = 250

SHELL_LANGS = {"bash", "sh", "shell", "console"}
#: Commands that are not run, matched against the whole command (tokens joined by single spaces), with the reason.
EXCLUDED = {
    r"make demo( .*)?": "installs .venv and runs the full demo (about 10 minutes); tests/test_quickstart.py runs a "
                        "reduced quickstart, and this module one for the demo's students",
    r"make test": "runs the whole test suite, this module included",
    r"pip install .*": "installs packages from an index",
    r"torchrun .*": "several processes (a cache built in shares); the single-process command next to it is run",
    r"NODE_RANK=.*": "one process per node of a multi-node launch; tests/engine/test_two_nodes.py runs two over the "
                     "loopback",
}
TRAINING = ("train", "sweep", "features", "prompts", "cache build", "cache export")
#: Config groups whose choice, as written, is part of a command's shape (besides the composed data, teacher,
#: student and method).
GROUPS = ("experiment", "logger", "callbacks")
#: Settings that do not change what a command exercises (where it reads and writes, sizes, devices, optimiser):
#: left out of its shape. A key is operational when it equals one of these or starts with one ending in ".".
OPERATIONAL = ("data.root", "data.batch_size", "data.num_workers", "data.val_fraction", "run_dir", "paths.",
               "trainer", "trainer.", "optim", "optim.", "scheduler", "scheduler.", "student.pretrained", "seed")
REAL_CLIP_TEACHERS = ("convnext_xxlarge", "vit_b16", "vit_l14")
#: Tiny open_clip teachers the tests may load (random or shipped weights).
TINY_CLIP_MODELS = ("pand-tiny-vit", "pand-fmnist-clip")
#: Class count of each dataset's fixture where it differs from the config's.
FIXTURE_CLASSES = {"cub": 3, "cifar100": 5, "imagenet": 3}
#: The fixed paths of the docs -> fixture (name under the fixtures folder) or a path inside the page's folder.
PATHS = {
    "/path/to/CUB_200_2011": "fixtures:CUB_200_2011",
    "/path/to/imagenet": "fixtures:imagenet",
    "/path/to/my_images": "fixtures:my_images",
    "/data/coco": "fixtures:coco",
    "/data/bird_photos": "fixtures:bird_photos",
    "/data/shards": "fixtures:shards/train",
    "/shared/path/run": "runs/shared-path-run",
}
#: Text substitutions in python code: (documented, run).
PYTHON_RULES = (
    ('"convnext_xxlarge", "laion2b_s34b_b82k_augreg_soup"', '"pand-tiny-vit", "random"'),
    ('get_dataset("cub", "data", "train")', 'get_dataset("cub", DATA_ROOT, "train")'),
    ('build_student("resnet18", num_classes=len(train.classes))',
     'build_student("resnet18", num_classes=len(train.classes), pretrained=False)'),
)
#: What a page may read without writing it first: path prefix -> what provides it (see provide()).
QUICKSTART, PHOTOS, FEATURES = "runs/quickstart/", "photos/", "runs/features/"
PREREQUISITES = {
    QUICKSTART: "the demo's students: a reduced pand quickstart (1 epoch, 2 images per class), built once",
    PHOTOS: "four Fashion-MNIST test images as PNG files, named as the demo's",
    FEATURES: "PAND stage 1 (pand prompts) for the command's data, teacher and prompt settings",
}


# ----------------------------------------------------------------------------------------------------- extraction
def _id(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


@dataclass
class Command:
    page: Path
    line: int
    kind: str  # "shell" or "python"
    text: str  # the command as written (continuations joined, comment dropped); python: the code
    words: list[str] = field(default_factory=list)
    pipe: list[str] = field(default_factory=list)  # the words after "|"

    def __str__(self) -> str:
        return f"{_id(self.page)}:{self.line}: {self.text}"


def fenced_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, language, lines) of every fenced block; the fence's indentation is removed."""
    blocks, current = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^(\s*)```\s*([\w+-]*)\s*$", line)
        if current is None:
            if fence:
                current = (n, fence.group(2).lower(), len(fence.group(1)), [])
        elif re.match(r"^\s*```\s*$", line):
            blocks.append((current[0], current[1], current[3]))
            current = None
        else:
            current[3].append(line[current[2]:] if line[: current[2]].strip() == "" else line.lstrip())
    assert current is None, f"{path}: the block opened at line {current[0]} is not closed"
    return blocks


def commands(path: Path) -> list[Command]:
    found = []
    for start, lang, lines in fenced_blocks(path):
        if lang == "python":
            found.append(Command(path, start, "python", "\n".join(lines)))
            continue
        if lang not in SHELL_LANGS:
            continue
        logical, first = "", None
        for offset, raw in enumerate(lines, start + 1):
            if lang == "console" and not logical:
                if not raw.startswith("$ "):
                    continue
                raw = raw[2:]
            first = first or offset
            if raw.rstrip().endswith("\\"):
                logical += raw.rstrip()[:-1] + " "
                continue
            logical += raw
            words = shlex.split(logical, comments=True)
            if words:
                pipe = []
                if "|" in words:
                    at = words.index("|")
                    words, pipe = words[:at], words[at + 1:]
                found.append(Command(path, first, "shell", " ".join(words + (["|", *pipe] if pipe else [])),
                                     words, pipe))
            logical, first = "", None
        assert not logical, f"{path}:{start}: a continued line ends the block"
    return found


ALL = [c for page in PAGES for c in commands(page)]


def excluded(cmd: Command) -> str | None:
    return next((why for pattern, why in EXCLUDED.items() if re.fullmatch(pattern, cmd.text)), None)


def subcommand(words: list[str]) -> str:
    """``train``, ``cache build``, ...; ``train -m`` is a sweep."""
    if words[1:3] in (["cache", "build"], ["cache", "export"]):
        return " ".join(words[1:3])
    sub = words[1] if len(words) > 1 else ""
    if sub == "train" and any(w in ("-m", "--multirun") for w in words):
        return "sweep"
    return sub


def overrides(words: list[str]) -> list[str]:
    """The key=value overrides of a training-type command (flags and their values left out)."""
    out, skip = [], False
    for w in words[3 if words[1] == "cache" else 2:]:
        if skip:
            skip = False
        elif w in ("--sweep-dir",):
            skip = True
        elif not w.startswith("-") and not (words[1:3] == ["cache", "export"] and w.startswith("out=")):
            out.append(w)
    return out


def _operational(key: str) -> bool:
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in OPERATIONAL)


def shape(cmd: Command) -> tuple:
    """The subcommand, the composed dataset, teacher, student and method, and the other keys it sets (with the
    value for GROUPS), but for the operational ones."""
    config = composed(cmd)
    what = (config["data"]["name"], config["teacher"].get("kind"), config["teacher"].get("model"),
            config["student"]["name"], config["method"]["name"])
    keys = []
    for o in overrides(cmd.words):
        key, _, value = o.partition("=")
        key = key.lstrip("+~")
        if key in GROUPS:
            keys.append(f"{key}={value}")
        elif not _operational(key) and key not in ("data", "teacher", "student", "method"):
            keys.append(key)
    return subcommand(cmd.words), what, tuple(sorted(keys))


_COMPOSED: dict[tuple[str, ...], dict] = {}


def composed(cmd: Command) -> dict:
    """The config a training-type command composes as written (a swept key at its first value), after pand's own
    setting checks; composed once per command."""
    key = tuple(cmd.words)
    if key not in _COMPOSED:
        args = []
        for o in overrides(cmd.words):
            k, _, v = o.partition("=")
            args.append(f"{k}={v.split(',')[0]}" if _is_sweep(v) else o)
        config = to_plain(compose("train", args))
        validate_train_settings(config)
        _COMPOSED[key] = config
    return _COMPOSED[key]


# ---------------------------------------------------------------------------------------------------- tiny rules
def _is_sweep(value: str) -> bool:
    return "," in value and not value.startswith(("[", "{", "'", '"'))


def _first_values(value: str) -> str:
    """A swept value list (a,b,c) shortened to its first two values."""
    return ",".join(value.split(",")[:2]) if _is_sweep(value) else value


def _tiny_settings(fixtures: Path) -> dict[str, str]:
    """The sizes of tests/engine/conftest.py's tiny run (reused, not copied), as key -> value."""
    pairs = dict(o.split("=", 1) for o in tiny_overrides(fixtures, "unused"))
    keep = ("data.image_size", "data.resize_size", "data.batch_size", "data.num_workers", "student.pretrained",
            "trainer.enable_progress_bar", "trainer.log_every_n_steps")
    return {k: pairs[k] for k in keep}


def _map_path(value: str, fixtures: Path) -> str:
    for documented, target in PATHS.items():
        if value == documented or value.startswith(documented + "/"):
            base = str(fixtures / target.split(":", 1)[1]) if target.startswith("fixtures:") else target
            return base + value[len(documented):]
    return value


def _features_of_tiny(value: str) -> str:
    """A stage-1 file path written for a real teacher, as the tiny teacher's stage 1 writes it."""
    return re.sub(r"(features/[^/]+?)-(convnext_xxlarge|ViT-B-16|ViT-L-14)/", r"\1-pand-tiny-vit/", value)


def tiny_argv(cmd: Command, fixtures: Path, index: int) -> list[str]:
    """The argv (without ``pand``) that runs ``cmd`` at test size; see the module docstring."""
    words, sub = cmd.words, subcommand(cmd.words)
    if sub not in TRAINING:
        return [_map_path(w, fixtures) if "=" not in w else w.split("=", 1)[0] + "=" +
                _map_path(w.split("=", 1)[1], fixtures) for w in words[1:]]
    config = composed(cmd)
    data = config["data"]["name"]
    resume = bool(config.get("ckpt_path"))
    subst = {
        "teacher": lambda v: "tiny" if v in REAL_CLIP_TEACHERS else v,
        "trainer": lambda v: "cpu",
        "trainer.devices": lambda v: "1",
        "trainer.num_nodes": lambda v: "1",
        "trainer.max_epochs": lambda v: "2" if resume else "1",
        "data.samples_per_class": lambda v: "3" if v not in ("0", "null") else v,
        "data.unlabelled_limit": lambda v: "12",
        "data.batch_size": lambda v: "4",
        "cache.views": lambda v: "2",
        "prompts.epochs": lambda v: "1",
        "student.pretrained": lambda v: "false",
        "teacher.text_features": _features_of_tiny,
    }
    out, given = [], set()
    flags = [w for w in words[2:] if w.startswith("-")]
    for o in overrides(words):
        key, _, value = o.partition("=")
        bare = key.lstrip("+~")
        given.add(bare)
        if bare == "teacher.weights":  # a state dict of the user's: the random stand-in instead
            out.append("teacher.pretrained=random")
            continue
        value = _map_path(subst.get(bare, lambda v: v)(_first_values(value)), fixtures)
        if bare == "data.unlabelled" and value.startswith("captions:"):
            value = "captions:" + _map_path(value[len("captions:"):], fixtures)
        if bare == "data.unlabelled" and value.strip('"').startswith("wds:"):
            value = '"wds:' + _map_path(value.strip('"')[len("wds:"):], fixtures) + '"'

        out.append(f"{key}={value}")
    teacher = config["teacher"]
    extra = {}
    if teacher.get("kind", "clip") == "clip" and teacher["model"] not in TINY_CLIP_MODELS and "teacher" not in given:
        extra["teacher"] = "tiny"
    if config["trainer"].get("accelerator") != "cpu" or config["trainer"].get("strategy") not in ("auto", None):
        extra.update({"trainer": "cpu", "trainer.strategy": "auto"})
    extra.update({"trainer.devices": "1", "trainer.num_nodes": "1", "trainer.sync_batchnorm": "false",
                  "trainer.max_epochs": "2" if resume else "1"})
    if data in FIXTURE_CLASSES:
        extra["data.num_classes"] = str(FIXTURE_CLASSES[data])
    if "data.root" not in given and data not in ("imagefolder", "captions"):
        extra["data.root"] = str(fixtures)
    extra.update(_tiny_settings(fixtures))
    extra.update({"features.num_workers": "0", "features.device": "cpu", "features.batch_size": "8",
                  "prompts.epochs": "1", "prompts.batch_size": "4", "cache.batch_size": "8"})
    if sub == "train" and not config.get("run_dir") and not resume:
        extra["run_dir"] = f"runs/docs-run-{index}"
    out += [f"{k}={v}" for k, v in extra.items() if k not in given]
    head = sub.split() if sub.startswith("cache") else [words[1]]
    out += [w for w in words[3:] if sub == "cache export" and w.startswith("out=")]  # the export's own option
    sweep_dir = [w for i, w in enumerate(words) if i and words[i - 1] == "--sweep-dir"]
    flags = [f for f in flags if f != "--sweep-dir"]
    return [*head, *flags, *out, *(["--sweep-dir", sweep_dir[0]] if sweep_dir else [])]


# -------------------------------------------------------------------------------------------------- prerequisites
def _reads(cmd: Command) -> list[str]:
    """What a command may read: every value and positional argument (python: the code), and a stage-1 file."""
    if cmd.kind == "python":
        return re.findall(r"""["']([^"']+)["']""", cmd.text)
    found = [w.split("=", 1)[-1] for w in cmd.words[1:]]
    if subcommand(cmd.words) in TRAINING:
        found.append(composed(cmd)["teacher"].get("text_features") or "")
    return found


def _writes(cmd: Command) -> list[str]:
    if cmd.kind != "shell" or cmd.words[0] != "pand":
        return []
    keys = ("run_dir", "out", "clip_benchmark_dir", "cache.dir")
    found = [w.split("=", 1)[1] for w in cmd.words if w.split("=", 1)[0] in keys]
    found += [cmd.words[i + 1] for i, w in enumerate(cmd.words[:-1]) if w in ("--out", "--sweep-dir")]
    if subcommand(cmd.words) in ("features", "prompts"):
        found.append(composed(cmd)["features"]["dir"])
    return [f for f in found if f]


def needed_later(cmd: Command, later: list[Command]) -> bool:
    writes = _writes(cmd)
    return any(w in r for c in later for r in _reads(c) for w in writes)


def _training(cmd: Command) -> bool:
    return cmd.kind == "shell" and cmd.words[0] == "pand" and subcommand(cmd.words) in TRAINING


def plan(cmds: list[Command], ran: set) -> list[bool]:
    """Whether each command of a page runs: all but the excluded ones and the training-type commands whose shape
    already ran (on an earlier page or earlier on this one) and whose outputs no later running command reads."""
    seen, repeat = set(ran), []
    for cmd in cmds:
        repeat.append(_training(cmd) and not cmd.pipe and shape(cmd) in seen)
        if _training(cmd):
            seen.add(shape(cmd))
    runs = [not excluded(c) for c in cmds]
    for i in reversed(range(len(cmds))):
        if runs[i] and repeat[i]:
            runs[i] = needed_later(cmds[i], [c for c, r in zip(cmds[i + 1:], runs[i + 1:]) if r])
    return runs


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the tiny runs are no faster on two, and a second thread only waits for the first when the
    machine is busy (a run took 4x longer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    """Every dataset the docs name, tiny and in its official layout, under one parent (data.root)."""
    root = tmp_path_factory.mktemp("docs-fixtures")
    make_cub(root, n_classes=3, per_class=6, test_per_class=2)
    make_fashion_mnist(root / "fashion-mnist", n_train=60, n_test=20)
    make_cifar100(root)
    make_imagenet(root / "imagenet")
    make_imagefolder(root / "my_images")
    make_captions(root / "coco", n_train=20, n_test=4)
    make_shards(root / "shards", seed=50_000)  # other images than the CUB fixture's: no overlap
    for i in range(6):
        write_image(root / "bird_photos" / f"photo_{i}.jpg", i % 3, 3, seed=700 + i)
    return root


class Shared:
    """Prerequisites built once for the module and linked into the pages that read them."""

    def __init__(self, fixtures: Path, folder: Path):
        self.fixtures, self.folder = fixtures, folder

    def quickstart(self) -> Path:
        out = self.folder / "runs" / "quickstart"
        if not out.is_dir():
            rc, _, err = run_pand(["quickstart", "--out", str(out), "--per-class", "2", "--val-fraction", "0.5",
                                   "--epochs", "1", "--coop-epochs", "1", "--batch-size", "4", "--unlabelled", "0",
                                   "--no-tsne", "--jobs", "1", "--data-root", str(self.fixtures / "fashion-mnist")])
            assert rc == 0, err[-3000:]
            for last in out.rglob("last.ckpt"):  # only best.ckpt is read; 134 MB each
                last.unlink()
        return out

    def photos(self, dest: Path) -> None:
        images, labels = fashion_mnist_arrays(20, seed=2)
        for i, k in enumerate((9, 2, 1, 11)):  # Ankle boot, Pullover, Trouser, Trouser
            name = FASHION_MNIST_CLASSES[int(labels[k])].replace(" ", "_").replace("/", "_")
            Image.fromarray(np.asarray(images[k])).save(dest / f"test{i}_{name}.png")


@pytest.fixture(scope="module")
def shared(fixtures, tmp_path_factory):
    return Shared(fixtures, tmp_path_factory.mktemp("docs-shared"))


def provide(cmd: Command, shared: Shared, fixtures: Path, index: int) -> None:
    """Build what ``cmd`` reads from PREREQUISITES when no earlier command of the page wrote it."""
    reads = _reads(cmd)
    if any(r.startswith(QUICKSTART) for r in reads) and not Path(QUICKSTART).exists():
        Path(QUICKSTART).parent.mkdir(exist_ok=True)
        Path(QUICKSTART).symlink_to(shared.quickstart(), target_is_directory=True)
    if any(r.startswith(PHOTOS.rstrip("/")) for r in reads) and not Path(PHOTOS).exists():
        Path(PHOTOS).mkdir()
        shared.photos(Path(PHOTOS))
    if cmd.kind == "shell" and subcommand(cmd.words) in ("train", "sweep", "cache build"):
        wanted = _features_of_tiny(composed(cmd)["teacher"].get("text_features") or "")
        if wanted.startswith(FEATURES) and not Path(wanted).exists():
            keep = [o for o in overrides(cmd.words) if o.startswith(("prompts.", "data.root="))
                    or o.split("=", 1)[0].lstrip("+~") in ("data", "teacher", "experiment")]
            stage1 = Command(cmd.page, cmd.line, "shell", "", ["pand", "prompts", *keep])
            rc, _, err = run_pand(tiny_argv(stage1, fixtures, index))
            assert rc == 0, f"{cmd}\nprerequisite {stage1.words}:\n{err[-3000:]}"
            assert Path(wanted).exists(), f"{cmd}: stage 1 did not write {wanted}"


# ----------------------------------------------------------------------------------------------------- running
def run_pand(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_python(code: str, fixtures: Path) -> None:
    for documented, replacement in PYTHON_RULES:
        code = code.replace(documented, replacement)
    with contextlib.redirect_stdout(io.StringIO()):
        exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__", "DATA_ROOT": str(fixtures)})


def run_page(page: Path, fixtures: Path, shared: Shared, ran: set) -> list[str]:
    """Run the commands of ``page`` in the current folder; returns what happened to each."""
    cmds = [c for c in ALL if c.page == page]
    log = []
    for i, (cmd, runs) in enumerate(zip(cmds, plan(cmds, ran))):
        if excluded(cmd):
            log.append(f"excluded  {cmd}")
            continue
        if not runs:
            composed(cmd)
            log.append(f"composed  {cmd}")
            continue
        provide(cmd, shared, fixtures, i)
        if cmd.kind == "python" or cmd.words[0] == "python":
            run_python(cmd.text if cmd.kind == "python" else cmd.words[2], fixtures)
            log.append(f"python    {cmd}")
            continue
        training = subcommand(cmd.words) in TRAINING
        argv = tiny_argv(cmd, fixtures, i)
        rc, out, err = run_pand(argv)
        assert rc == 0, f"{cmd}\nran as: pand {shlex.join(argv)}\n{err[-4000:]}"
        if cmd.pipe:
            assert cmd.pipe[0] == "jq" and len(cmd.pipe) == 2, f"{cmd}: only '| jq .KEY' is understood"
            assert cmd.pipe[1].lstrip(".") in json.loads(out), f"{cmd}: stdout has no {cmd.pipe[1]}"
        if training:
            ran.add(shape(cmd))
        log.append(f"ran       {cmd}")
        _drop_unread_last_checkpoints(cmds[i + 1:])
    return log


def _drop_unread_last_checkpoints(later: list[Command]) -> None:
    """Remove the last.ckpt files (134 MB for a ResNet-18) that no later command of the page resumes from."""
    reads = [r for c in later for r in _reads(c)]
    for last in Path("runs").rglob("last.ckpt") if Path("runs").is_dir() else ():
        if not last.is_symlink() and not any(str(last) in r for r in reads):
            last.unlink()


# -------------------------------------------------------------------------------------------------------- tests
def test_every_command_is_run_or_excluded_with_a_reason():
    unknown = [str(c) for c in ALL if c.kind == "shell" and not excluded(c)
               and not (c.words[0] == "pand" or c.words[:2] == ["python", "-c"])]
    assert unknown == [], "neither run by this module nor in EXCLUDED (with the reason):\n" + "\n".join(unknown)
    unused = [p for p in EXCLUDED if not any(re.fullmatch(p, c.text) for c in ALL if c.kind == "shell")]
    assert unused == [], f"EXCLUDED entries that match no documented command: {unused}"
    assert all(not c.pipe or c.pipe[0] == "jq" for c in ALL), "a pipe other than '| jq .KEY'"


def test_every_training_command_composes_as_written():
    """Hydra composes every documented training-type command and pand's checks accept its settings, including
    those that the page run only composes (same shape) or would change (real teachers, GPUs)."""
    for cmd in ALL:
        if cmd.kind == "shell" and cmd.words[0] == "pand" and subcommand(cmd.words) in TRAINING:
            composed(cmd)


@pytest.fixture(scope="module")
def ran_shapes():
    return set()


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[_id(p) for p in PAGES])
def test_the_commands_of_a_page_run(page, fixtures, shared, ran_shapes, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PAND_DATA_DIR", str(fixtures))
    monkeypatch.delenv("PAND_RUNS_DIR", raising=False)
    try:
        run_page(page, fixtures, shared, ran_shapes)
    finally:
        os.chdir(ROOT)
        shutil.rmtree(tmp_path, ignore_errors=True)  # checkpoints of ResNet-18s: 180 MB a run


def test_readme_is_a_map():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= README_MAX_LINES
    assert text.count("<!-- quickstart-table -->") == 1 and text.count("<!-- /quickstart-table -->") == 1
    assert text.index("<!-- quickstart-table -->") < text.index("<!-- /quickstart-table -->")
    assert "`make test` is what CI runs (`.ci/run`)" in text
    for page in sorted(DOCS.glob("*.md")):
        assert f"docs/{page.name}" in text or page.name in (DOCS / "index.md").read_text(), page


# --------------------------------------------------------------------------------------------------------- links
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*\*|__", "", heading.strip().lower())
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found, seen, fenced = set(), {}, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if re.match(r"^\s*```", line):
            fenced = not fenced
        m = None if fenced else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            base = slug(m.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[tuple[int, str]]:
    """(line, target) of every inline link and image outside code."""
    found, fenced = [], False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if re.match(r"^\s*```", line):
            fenced = not fenced
            continue
        if fenced:
            continue
        line = re.sub(r"`[^`]*`", "", line)
        found += [(n, t) for t in re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", line)]
    return found


@pytest.mark.parametrize("page", LINKED, ids=[_id(p) for p in LINKED])
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for n, target in links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{_id(page)}:{n}: {target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{_id(page)}:{n}: {target} (no heading #{anchor})")
    assert broken == []


def test_the_slug_follows_github():
    assert slug("Unlabelled images: test accuracy against their number (Fashion-MNIST, CPU)") == \
        "unlabelled-images-test-accuracy-against-their-number-fashion-mnist-cpu"
    assert slug("Speed: the teacher cache") == "speed-the-teacher-cache"
    assert slug("Measuring: `pand bench`") == "measuring-pand-bench"
    assert slug("Stage 1: CoOp on stored features, CUB size") == "stage-1-coop-on-stored-features-cub-size"
