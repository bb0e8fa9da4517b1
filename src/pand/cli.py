"""pand: distil vision-language teachers into lightweight students.

    pand train [overrides...]            distil (Hydra overrides: data=cub method=vl2lite trainer.devices=4 ...)
    pand eval ckpt_path=PATH [overrides] evaluate a student checkpoint on val and test
    pand predict ckpt_path=PATH images=FILE|DIR|GLOB [topk=5] [classes=[a,b]|classes_file=F] [out=preds.csv|.json]
                                         top-k classes of image files (open-vocabulary students: any class names)
    pand config [overrides...]           print the composed training config
    pand features [overrides...]         PAND stage 1: store the teacher's image embeddings of train/val/test
    pand prompts [overrides...]          PAND stage 1: learn CoOp prompts on the stored embeddings
    pand sweep [overrides...]            one training run per combination of comma-separated values
                                         (also: pand train -m method.nlrd.weight=0,0.1,1.0), then a table and plot
    pand gather RUN_DIR... --out DIR     gather runs' summary.json into results.csv / .md / .png
    pand tsne CKPT... --labels a,b --out DIR   t-SNE of the students' test features, side by side
    pand quickstart [--out DIR] [--seeds N]     the whole pipeline offline on Fashion-MNIST (a few minutes, CPU)
    pand cache build cache.dir=DIR cache.views=K [overrides]   store K augmented views per training image with the
                                         teacher's embedding of each (torchrun --nproc_per_node=N splits the work)
    pand bench [--json] [--teacher ...]  ms per training step: student alone vs online teacher vs teacher cache
                                         (--latency: inference ms, images/s, params, FLOPs, student vs teacher)
    pand teacher fit [--out PATH]        re-fit the compact Fashion-MNIST CLIP teacher the quickstart ships with
    pand export ckpt_path=PATH format=onnx|torch_export|safetensors out=DIR [class_names=a,b,...]
                                         the student alone, for use without pand, with student.json beside it
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence

from pand.errors import PandError
from pand.io import OUTPUT_ERRNOS

USAGE = __doc__


def _split_eval_args(args: Sequence[str]) -> tuple[dict, dict]:
    """``pand eval`` options (ckpt_path, splits, out) vs overrides of the checkpoint's config."""
    from omegaconf import OmegaConf

    from pand.config import compose

    own_keys = ("ckpt_path=", "splits=", "out=")
    own = compose("eval", [a for a in args if a.startswith(own_keys)])
    overrides = OmegaConf.to_container(OmegaConf.from_dotlist([a for a in args if not a.startswith(own_keys)]))
    return OmegaConf.to_container(own), overrides


def cmd_train(args: Sequence[str]) -> int:
    if args and args[0] in ("-m", "--multirun"):
        return cmd_sweep(args[1:])
    from pand.config import compose, to_plain
    from pand.engine.run import train

    summary = train(to_plain(compose("train", args)))
    print(json.dumps(summary, indent=2))
    return 0


def _key_value_options(command: str, args: Sequence[str], allowed: Sequence[str], required: Sequence[str],
                       usage: str) -> dict:
    """The ``key=value`` options of a command that takes no config overrides (lists as ``key=[a,b]``); an unknown
    key or a missing required one is refused with the usage line."""
    from omegaconf import OmegaConf

    from pand.errors import ConfigError

    bad = [a for a in args if a.partition("=")[0] not in allowed or "=" not in a]
    if bad:
        raise ConfigError(f"unknown argument {bad[0]!r}; pand {command} takes {', '.join(allowed)}; usage: {usage}")
    opts = OmegaConf.to_container(OmegaConf.from_dotlist(list(args)))
    missing = [k for k in required if opts.get(k) in (None, "")]
    if missing:
        raise ConfigError(f"pand {command} needs {', '.join(f'{k}=...' for k in missing)}; usage: {usage}")
    return opts


_PREDICT_KEYS = ("ckpt_path", "images", "topk", "classes", "classes_file", "out", "batch_size", "num_workers",
                 "device")


def cmd_predict(args: Sequence[str]) -> int:
    from pand.predict import format_predictions, predict

    usage = "pand predict ckpt_path=PATH images=FILE|DIR|GLOB [topk=5] [classes=[a,b]|classes_file=F] [out=F.csv]"
    opts = _key_value_options("predict", args, _PREDICT_KEYS, ("ckpt_path", "images"), usage)
    rows = predict(str(opts["ckpt_path"]), str(opts["images"]), topk=int(opts.get("topk", 5)),
                   classes=opts.get("classes"), classes_file=opts.get("classes_file"), out=opts.get("out"),
                   batch_size=int(opts.get("batch_size", 64)), num_workers=int(opts.get("num_workers", 0)),
                   device=str(opts.get("device", "auto")))
    if opts.get("out"):
        print(format_predictions(rows), file=sys.stderr)
        print(json.dumps({"images": len(rows), "out": str(opts["out"])}, indent=2))
    else:
        print(json.dumps(rows, indent=2))  # stdout stays machine-readable
    return 0


def cmd_eval(args: Sequence[str]) -> int:
    from pand.engine.run import evaluate

    own, overrides = _split_eval_args(args)
    results = evaluate(own["ckpt_path"], overrides, splits=tuple(own["splits"]), out=own.get("out"))
    print(json.dumps(results, indent=2))
    return 0


def cmd_config(args: Sequence[str]) -> int:
    from omegaconf import OmegaConf

    from pand.config import compose

    print(OmegaConf.to_yaml(compose("train", args)))
    return 0


def cmd_features(args: Sequence[str]) -> int:
    from pand.config import compose, to_plain
    from pand.engine.stage1 import run_features

    cfg = to_plain(compose("coop", args))
    for split, (embeds, _) in run_features(cfg).items():
        print(f"{split}: {tuple(embeds.shape)} -> {cfg['features']['dir']}/{split}.safetensors")
    return 0


def cmd_prompts(args: Sequence[str]) -> int:
    from pand.config import compose, to_plain
    from pand.engine.stage1 import run_prompts

    summary = run_prompts(to_plain(compose("coop", args)))
    print(
        f"teacher zero-shot: val {summary['zero_shot_val_acc']:.4f} test {summary['zero_shot_test_acc']:.4f}\n"
        f"teacher CoOp:      val {summary['coop_val_acc']:.4f} test {summary['coop_test_acc']:.4f} "
        f"(best epoch {summary['best_epoch']})\n"
        f"learned text features: {summary['text_features']}\n"
        f"stage 2: pand train method=pand teacher.text_features={summary['text_features']} ..."
    )
    return 0


def cmd_sweep(args: Sequence[str]) -> int:
    from pand.analysis.sweep import main_sweep

    return main_sweep(list(args))


def cmd_gather(args: Sequence[str]) -> int:
    from pand.analysis.sweep import main_gather

    return main_gather(list(args))


def cmd_tsne(args: Sequence[str]) -> int:
    from pand.analysis.tsne import main_tsne

    return main_tsne(list(args))


def cmd_quickstart(args: Sequence[str]) -> int:
    from pand.quickstart import main_quickstart

    return main_quickstart(list(args))


def cmd_cache(args: Sequence[str]) -> int:
    if not args or args[0] != "build":
        print("usage: pand cache build cache.dir=DIR cache.views=K [overrides...]", file=sys.stderr)
        return 2
    from pand.config import compose, to_plain
    from pand.engine.run import build_cache

    cache = build_cache(to_plain(compose("train", args[1:])))
    if cache is not None:
        m = cache.meta
        print(f"teacher cache complete: {cache.folder} ({m['num_samples']} images x {m['views']} views, "
              f"{cache.describe_outputs()})")
    return 0


def cmd_bench(args: Sequence[str]) -> int:
    from pand.bench import main_bench

    return main_bench(list(args))


def cmd_teacher(args: Sequence[str]) -> int:
    if not args or args[0] != "fit":
        print("usage: pand teacher fit [--out PATH] [--epochs N] [--seed S]", file=sys.stderr)
        return 2
    from pand.teachers.fit import main_fit

    return main_fit(list(args[1:]))


_EXPORT_KEYS = ("ckpt_path", "format", "out", "class_names")


def cmd_export(args: Sequence[str]) -> int:
    from pand.export import export_student
    from pand.predict import read_class_names

    usage = "pand export ckpt_path=PATH format=onnx|torch_export|safetensors out=DIR [class_names=a,b,...]"
    opts = _key_value_options("export", args, _EXPORT_KEYS, ("ckpt_path", "format", "out"), usage)
    names = read_class_names(opts.get("class_names"), None)
    result = export_student(str(opts["ckpt_path"]), str(opts["format"]), str(opts["out"]), class_names=names)
    vocab = result["student"].get("open_vocabulary")
    if vocab is not None:
        # A vocabulary of thousands of rows belongs in student.json, not on the terminal.
        rows, dim = vocab["text_matrix_shape"]
        vocab = {**vocab, "text_matrix": f"<{rows} x {dim}, in {result['files'][-1]}>"}
        result = {**result, "student": {**result["student"], "open_vocabulary": vocab}}
    print(json.dumps(result, indent=2))
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the stream that was current at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _setup_logging() -> None:
    # Warnings from libraries once (Lightning's own INFO lines already reach the terminal through its handler);
    # pand's INFO lines through their own handler.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    pand_log = logging.getLogger("pand")
    if not pand_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("pand: %(message)s"))
        pand_log.addHandler(handler)
    pand_log.setLevel(logging.INFO)
    pand_log.propagate = False


COMMANDS = {
    "train": cmd_train,
    "eval": cmd_eval,
    "predict": cmd_predict,
    "config": cmd_config,
    "features": cmd_features,
    "prompts": cmd_prompts,
    "sweep": cmd_sweep,
    "gather": cmd_gather,
    "tsne": cmd_tsne,
    "quickstart": cmd_quickstart,
    "cache": cmd_cache,
    "bench": cmd_bench,
    "teacher": cmd_teacher,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"pand: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    _setup_logging()
    try:
        return COMMANDS[command](args)
    except PandError as err:
        return _fail(command, str(err))
    except OSError as err:
        # A full disk, a read-only or forbidden folder: the user's environment, not a bug; name the file.
        if err.errno not in OUTPUT_ERRNOS:
            raise
        where = f": {err.filename}" if err.filename else ""
        return _fail(command, f"{OUTPUT_ERRNOS[err.errno]}{where} ({err.strerror or err})")


def _fail(command: str, message: str) -> int:
    """One clear message and exit status 2 for bad input; unexpected errors keep their traceback instead."""
    print(f"pand {command}: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
