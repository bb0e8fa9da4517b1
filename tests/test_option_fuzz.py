"""Fuzz of the option parsers of every command: a wrong value, key or flag is refused with exit status 2 and one error,
before any model or data is loaded.

The cases are drawn with a fixed seed from each command's real options (the rules of pand.rules and pand.engine.config_checks, the argparse
parsers) and are invalid by construction: every value breaks its option's rule, whatever the parser (Hydra's override
grammar for the config commands, YAML for eval / predict / export, argparse for the others) makes of it. Each case runs
``pand.cli.main`` in this process; nothing is stubbed, but the entry points of the heavy work (training, loading a
student, measuring, fitting, ...) are replaced by tripwires, so that a case that slipped through fails at once with
its argv instead of starting that work. Refusals take milliseconds (about 0.15 s where Hydra composes the config), so
the case count keeps the file to some twenty seconds.

What one error means: stderr holds exactly one line, ``pand COMMAND: error: ...`` (no traceback, no log line, no
usage block, no drawing of where Hydra's grammar stopped), and nothing is printed on stdout.
"""

from __future__ import annotations

import random

import pytest
import torch

from pand.bench import _rules as bench_rules
from pand.bench import parser as bench_parser
from pand.cli import _EXPORT_KEYS, _PREDICT_KEYS, main
from pand.engine.config_checks import TRAIN_RULES
from pand.quickstart import parser as quickstart_parser
from pand.rules import EXPORT_RULES, PREDICT_RULES, Rule
from pand.stage1.checks import COOP_RULES

SEED = 22

# Placeholders filled in by the `paths` fixture: a file that is never read as a checkpoint, a folder of images that
# are never opened, a text file, a folder, and a path that does not exist.
FILE, IMAGES, NAMES, FOLDER, MISSING = "{file}", "{images}", "{names}", "{folder}", "{missing}"

# Values that no parser reads: unbalanced brackets and quotes, `=` inside the value, unicode (Hydra's grammar reads no
# unquoted unicode; YAML reads it as a string, which no rule of these options takes).
UNREADABLE = ("[1,2", "]", "{a", "'x", "1=2", "é€😀")
# ... and a mapping, which any rule refuses but `pand config`, which only prints the config, would take
JUNK = (*UNREADABLE, "{a: 1}")


def bad_values(rule: Rule) -> list[str]:
    """Typed values that ``rule`` refuses, read by Hydra or by YAML alike."""
    values = ["abc", "[x]"] + ([] if rule.optional else ["null", ""])
    step = 1 if rule.kind in ("int", "ints") else 0.5
    below = None if rule.low is None else _number(rule.low if rule.low_open else rule.low - step)
    above = None if rule.high is None else _number(rule.high if rule.high_open else rule.high + step)
    if rule.kind in ("int", "float"):
        values += ["true", "1e999"]  # 1e999 is read as infinity
        if rule.kind == "int":
            values.append("1.5")
        if below is not None:
            values += [below, "-99999999999999999999"]
        if above is not None:
            values += [above, "99999999999999999999"]
    elif rule.kind == "choice":
        values += ["zzz", "1"]
    elif rule.kind == "bool":
        values += ["maybe", "2", "[true]"]
    elif rule.kind == "floats":
        values += ["[1,2]" if rule.length != 2 else "[1,2,3]", "[a,b,c]", "1"]
        if below is not None:
            values.append("[" + ",".join([below] * (rule.length or 1)) + "]")
    elif rule.kind == "ints":
        values += ["[a]", "1", "[1.5]"]
        if below is not None:
            values.append(f"[{below}]")
    return values


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def _misspelt(key: str) -> str:
    return key + "zz"


def _devices_refused_here() -> list[str]:
    devices = ["tpu", "CPU", "gpu", "cuda:-1", "cuda:01", "cuda:0:1", "cuda0", "é", "[cpu]"]
    if not torch.cuda.is_available():
        devices.append("cuda")
    if not torch.backends.mps.is_available():
        devices.append("mps")
    return devices


# ---------------------------------------------------------------------------------------------------- case makers
def _config_command_cases(rng: random.Random, command: list[str], rules: dict[str, Rule], n: int) -> list[list[str]]:
    """train, features, prompts, cache build, sweep: one invalid setting, an unknown key or group option, a flag."""
    keys = sorted(rules)
    cases = []
    for _ in range(n):
        kind = rng.random()
        key = rng.choice(keys)
        if kind < 0.75:
            cases.append([*command, f"{key}={rng.choice(bad_values(rules[key]) + list(JUNK))}"])
        elif kind < 0.85:
            cases.append([*command, f"{_misspelt(key)}={rng.choice(['1', 'abc'])}"])
        elif kind < 0.95:
            cases.append([*command, f"{rng.choice(['data', 'method', 'student', 'teacher', 'optim'])}=zzz"])
        else:
            cases.append([*command, rng.choice(["--zzz", "-x", "--max-epochs=3"])])
    return cases


def _config_cases(rng: random.Random, n: int) -> list[list[str]]:
    """pand config prints any config it can compose: only what cannot be composed is wrong there."""
    keys = sorted(TRAIN_RULES)
    makers = [
        lambda: [f"{_misspelt(rng.choice(keys))}=1"],
        lambda: [f"{rng.choice(['data', 'method', 'scheduler', 'logger'])}={rng.choice(['zzz', 'cubb', 'Cub'])}"],
        lambda: [f"{rng.choice(keys)}={rng.choice(UNREADABLE)}"],
        lambda: [rng.choice(["--zzz", "--resolved", "-r"])],
    ]
    return [["config", *rng.choice(makers)()] for _ in range(n)]


def _eval_cases(rng: random.Random, n: int) -> list[list[str]]:
    keys = sorted(TRAIN_RULES)
    base = [f"ckpt_path={FILE}"]
    makers = [
        lambda: [*base, f"splits={rng.choice(['abc', '[val,zzz]', '[]', '[val', '1', 'null', '[[val]]', 'Val'])}"],
        lambda: [*base, f"out={rng.choice([FOLDER, 'results.txt', f'{FILE}/r.json', 'results'])}"],
        lambda: [f"ckpt_path={rng.choice([FOLDER, MISSING])}"],
        lambda: [*base, (key := rng.choice(keys)) + "=" + rng.choice(bad_values(TRAIN_RULES[key]))],
        lambda: [*base, f"{rng.choice(['data', 'trainer', 'student', 'method'])}={rng.choice(['cub', '1', 'null'])}"],
        lambda: [*base, rng.choice(["+data.x=1", "~data", "data", "=1", "data..root=x", "--splits=test"])],
        lambda: [*base, f"{rng.choice(keys)}={rng.choice(['[1,2', '{a', 'x=${y', chr(39) + 'x'])}"],
    ]
    return [["eval", *rng.choice(makers)()] for _ in range(n)]


def _predict_cases(rng: random.Random, n: int) -> list[list[str]]:
    base = {"ckpt_path": FILE, "images": IMAGES}

    def with_(key: str, value: str) -> list[str]:
        return [f"{k}={v}" for k, v in {**base, key: value}.items()]

    makers = [
        lambda: with_(key := rng.choice(sorted(PREDICT_RULES)),
                      rng.choice(bad_values(PREDICT_RULES[key]) + list(JUNK))),
        lambda: with_("device", rng.choice(_devices_refused_here())),
        lambda: with_("ckpt_path", rng.choice([FOLDER, MISSING, ""])),
        lambda: with_("images", rng.choice([MISSING, f"{FOLDER}/*.zzz", f"{MISSING}/**/*.jpg", ""])),
        lambda: with_("out", rng.choice([FOLDER, "preds.txt", "preds", f"{FILE}/p.csv", "[a].xlsx"])),
        lambda: with_("classes", rng.choice(["[a,b", "[a,a]", "[]", "[[a],b]", "{a: 1}", "true", "a,,a", "[a,b]]"])),
        lambda: with_("classes_file", rng.choice([FOLDER, MISSING])),
        lambda: [*with_("classes", "[a,b]"), f"classes_file={NAMES}"],
        lambda: with_(_misspelt(rng.choice(_PREDICT_KEYS)), "1"),
        lambda: [*with_("topk", "1"), rng.choice(["--topk=1", "-k", "topk"])],
        lambda: [f"ckpt_path={FILE}"],
    ]
    return [["predict", *rng.choice(makers)()] for _ in range(n)]


def _export_cases(rng: random.Random, n: int) -> list[list[str]]:
    base = {"ckpt_path": FILE, "format": "safetensors", "out": FOLDER + "/export"}

    def with_(key: str, value: str) -> list[str]:
        return [f"{k}={v}" for k, v in {**base, key: value}.items()]

    makers = [
        lambda: with_("format", rng.choice(bad_values(EXPORT_RULES["format"]) + ["ONNX", "tflite", "torchscript"])),
        lambda: with_("ckpt_path", rng.choice([FOLDER, MISSING])),
        lambda: with_("out", rng.choice([FILE, f"{FILE}/sub"])),
        lambda: with_("class_names", rng.choice(["[a,a]", "[]", "[[a]]", "{a: 1}", "missing.txt", f"{MISSING}/n.txt",
                                                 FOLDER, "[a,b"])),
        lambda: with_(_misspelt(rng.choice(_EXPORT_KEYS)), "x"),
        lambda: [f"ckpt_path={FILE}", "format=onnx"],
        lambda: [*with_("format", "onnx"), "--opset=17"],
    ]
    return [["export", *rng.choice(makers)()] for _ in range(n)]


BATCH_LIST = "batch sizes"  # the type of bench's --latency-batches, a comma-separated list


def _argparse_type_values(kind: type | str) -> list[str]:
    """Values argparse's own type conversion refuses (it reads 1e999 and nan as floats, so those are not among them)."""
    if kind is int:
        return ["abc", "1.5", "", "é€😀", "[1]", "1e3", "0x10", "1,2"]
    if kind is float:
        return ["abc", "", "é€😀", "[1]", "1,5", "1..5"]
    return ["abc", "0", "-1", "", "1,x", "0,32", "1.5"]


def _argparse_cases(rng: random.Random, command: list[str], options: dict[str, type], choices: dict[str, tuple],
                    base: list[str], n: int, ranges: dict[str, Rule] | None = None) -> list[list[str]]:
    """An argparse command: a value of the wrong type, a choice it lacks, an unknown flag, a flag without its value
    and, where the command checks them (bench), values out of range."""
    makers = [
        lambda: [(flag := rng.choice(sorted(options))), rng.choice(_argparse_type_values(options[flag]))],
        lambda: [rng.choice(["--zzz", "--json=1", "-q", "--out-dir"]), "x"],
        lambda: [rng.choice(sorted(options))],  # no value after it
    ]
    if choices:
        makers.append(lambda: [rng.choice(sorted(choices)), rng.choice(["zzz", "FP32", "1", "é"])])
    if ranges:
        makers.append(lambda: [(flag := rng.choice(sorted(ranges))),
                               rng.choice([v for v in bad_values(ranges[flag]) if _is_number(v) and v != "1e999"])])
        makers.append(lambda: ["--device", rng.choice(_devices_refused_here())])
    cases = []
    for _ in range(n):
        extra = rng.choice(makers)()
        if len(extra) == 1 and extra[0] in options:
            cases.append([*command, *base, *extra])  # the flag last, so that nothing is taken for its value
        else:
            cases.append([*command, *extra, *base])
    return cases


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parser_options(parser) -> tuple[dict[str, type], dict[str, tuple]]:
    options, choices = {}, {}
    for action in parser._actions:
        flags = [s for s in action.option_strings if s.startswith("--")]
        if not flags or action.nargs == 0:
            continue
        if action.choices:
            choices[flags[0]] = tuple(action.choices)
        elif action.type in (int, float):
            options[flags[0]] = action.type
        elif action.type is not None:
            options[flags[0]] = BATCH_LIST
    return options, choices


# The argparse commands whose parser is built inside the function that runs them: their typed options by hand (the
# test below checks that each still exists).
TSNE_OPTIONS = {"--perplexity": float, "--seed": int, "--batch-size": int}
TSNE_CHOICES = {"--split": ("train", "val", "test")}
FIT_OPTIONS = {"--epochs": int, "--seed": int, "--batch-size": int, "--lr": float, "--threads": int}


def _cases() -> list[list[str]]:
    rng = random.Random(SEED)
    bench_options, bench_choices = _parser_options(bench_parser())
    quick_options, quick_choices = _parser_options(quickstart_parser())
    cases = [
        *_config_command_cases(rng, ["train"], TRAIN_RULES, 40),
        *_config_command_cases(rng, ["cache", "build"], TRAIN_RULES, 10),
        *_config_command_cases(rng, ["features"], COOP_RULES, 10),
        *_config_command_cases(rng, ["prompts"], COOP_RULES, 10),
        *_config_command_cases(rng, ["sweep"], TRAIN_RULES, 8),
        *_config_cases(rng, 10),
        *_eval_cases(rng, 40),
        *_predict_cases(rng, 60),
        *_export_cases(rng, 30),
        *_argparse_cases(rng, ["bench"], bench_options, bench_choices, [], 40, ranges=bench_rules()),
        *_argparse_cases(rng, ["quickstart"], quick_options, quick_choices, [], 15),
        *_argparse_cases(rng, ["tsne"], TSNE_OPTIONS, TSNE_CHOICES, [FILE, "--out", FOLDER], 15),
        *_argparse_cases(rng, ["teacher", "fit"], FIT_OPTIONS, {}, [], 15),
        *[["gather", *extra] for extra in rng.choices(
            [[FOLDER], ["--out", FOLDER], [MISSING, "--out", FOLDER], [FILE, "--out", FOLDER],
             [FOLDER, "--out", FILE], [FOLDER, "--out", FOLDER, "--zzz"], [FOLDER, "--out"]], k=10)],
        ["cache"], ["cache", "biuld"], ["teacher"], ["teacher", "fti"],
    ]
    return cases


CASES = _cases()


# ------------------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "images").mkdir()
    (root / "images" / "a.png").write_bytes(b"never opened")
    (root / "student.ckpt").write_bytes(b"never loaded")
    (root / "names.txt").write_text("cat\ndog\n")
    (root / "folder").mkdir()
    return {FILE: str(root / "student.ckpt"), IMAGES: str(root / "images"), NAMES: str(root / "names.txt"),
            FOLDER: str(root / "folder"), MISSING: str(root / "missing" / "nothing.ckpt")}


_HEAVY_WORK = (
    "pand.engine.run.train", "pand.engine.run.evaluate", "pand.engine.run.build_cache",
    "pand.stage1.run.run_features", "pand.stage1.run.run_prompts", "pand.deploy.load_student",
    "pand.predict.load_student", "pand.export.load_student",
    "pand.predict.predict", "pand.export.export_student", "pand.bench.measure.run_bench",
    "pand.quickstart.quickstart", "pand.analysis.sweep.gather_runs", "pand.analysis.tsne.tsne_compare",
    "pand.teachers.standin_fit.fit_teacher",
)


@pytest.fixture
def tripwires(monkeypatch):
    def tripwire(name: str):
        def reached(*args, **kwargs):
            raise AssertionError(f"{name} was reached: the options were accepted")
        return reached

    for target in _HEAVY_WORK:
        monkeypatch.setattr(target, tripwire(target))


def _fill(argv: list[str], paths: dict[str, str]) -> list[str]:
    filled = []
    for arg in argv:
        for placeholder, path in paths.items():
            arg = arg.replace(placeholder, path)
        filled.append(arg)
    return filled


@pytest.mark.parametrize("argv", CASES, ids=[f"{i}-{' '.join(c)[:60]}" for i, c in enumerate(CASES)])
def test_a_wrong_option_is_refused_with_one_error_before_any_work(argv, paths, tripwires, capsys):
    command = argv[0]
    code = main(_fill(argv, paths))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    lines = captured.err.rstrip("\n").split("\n")
    assert lines[0].startswith(f"pand {command}: error: "), captured.err
    assert "Traceback" not in captured.err
    assert len(lines) == 1, captured.err


def test_the_cases_cover_every_command_and_are_reproducible():
    from pand.cli import COMMANDS

    assert {c[0] for c in CASES} == set(COMMANDS)
    assert 300 <= len(CASES) <= 400
    assert _cases() == CASES


@pytest.mark.parametrize(("command", "options"), [
    (["tsne"], [*TSNE_OPTIONS, *TSNE_CHOICES]), (["teacher", "fit"], list(FIT_OPTIONS)),
])
def test_hand_listed_options_still_exist(command, options, capsys):
    assert main([*command, "--help"]) == 0
    text = capsys.readouterr().out
    assert all(flag in text for flag in options)


def test_the_rules_drawn_from_are_those_of_the_commands_options():
    assert set(PREDICT_RULES) < set(_PREDICT_KEYS) and set(EXPORT_RULES) < set(_EXPORT_KEYS)
    assert set(bench_rules()) < set(_parser_options(bench_parser())[0])
