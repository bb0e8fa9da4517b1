"""What ``pand COMMAND --help`` prints: usage lines, and the config groups and settings of
:mod:`pand.config_catalogue`.

No torch, Lightning, Hydra or OmegaConf is imported here, so that help is instant.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

from pand.config_catalogue import config_groups, config_settings, group_defaults

_WIDTH = 118
_COLUMN = 28  # where the descriptions start

# ----------------------------------------------------------------------------------------------------- help texts
def _wrap(label: str, text: str, *, indent: int = 2, column: int = _COLUMN) -> list[str]:
    head = " " * indent + label
    if not text:
        return [head]
    sub = " " * column
    if len(head) >= column - 1:
        return [head, *textwrap.wrap(text, _WIDTH, initial_indent=sub, subsequent_indent=sub)]
    return textwrap.wrap(text, _WIDTH, initial_indent=head.ljust(column), subsequent_indent=sub)


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def groups_text(config_name: str = "train") -> str:
    groups = config_groups()
    defaults = group_defaults(config_name)
    order = [g for g in defaults if g in groups] + [g for g in groups if g not in defaults]
    lines = ["config groups (GROUP=OPTION; the default in [brackets]):"]
    width = max((len(g) for g in order), default=0) + 4
    for g in order:
        opts = " ".join(f"[{o}]" if o == defaults.get(g) else o for o in groups[g])
        lines.extend(textwrap.wrap(opts, _WIDTH, initial_indent=f"  {g}".ljust(width),
                                   subsequent_indent=" " * width, break_on_hyphens=False))
    return "\n".join(lines)


def settings_text(config_name: str = "train", expand: Sequence[str] = ()) -> str:
    """The settings of ``config_name.yaml`` with their comments; sections in ``expand`` key by key, the others in one
    line each."""
    lines = [f"settings of {config_name}.yaml besides the groups "
             "(KEY=VALUE; `pand config` prints the composed config):"]
    for s in config_settings(config_name):
        if s.children and s.key in expand:
            lines.extend(_wrap(f"{s.key}.*", s.comment))
            for c in s.children:
                lines.extend(_wrap(f"{s.key}.{c.key}={_short(c.value, 100)}", c.comment, indent=4))
        elif s.children:
            lines.extend(_wrap(f"{s.key}.*", s.comment))
            keys = " ".join(c.key for c in s.children)
            lines.extend(textwrap.wrap(f"({keys})", _WIDTH, initial_indent=" " * _COLUMN,
                                       subsequent_indent=" " * (_COLUMN + 1)))
        else:
            lines.extend(_wrap(f"{s.key}={_short(s.value)}", s.comment))
    return "\n".join(lines)


_OVERRIDES = """\
overrides (Hydra syntax):
  GROUP=OPTION              choose a config of a group (listed below), e.g. data=cub method=pand trainer=gpu
  KEY=VALUE                 set a setting, e.g. optim.lr=3e-4 data.batch_size=128 data.root=/data/CUB_200_2011
  trainer.NAME=VALUE        any argument of lightning.Trainer, e.g. trainer.max_epochs=30 trainer.benchmark=true
                            (not logger, callbacks, plugins, enable_checkpointing, default_root_dir or
                            use_distributed_sampler, which pand sets: use logger=..., callbacks=..., run_dir=...)
  +KEY=VALUE, ~KEY          add a key the config does not have (e.g. +student.kwargs.drop_path_rate=0.1) / remove one
  A misspelt key or option is refused with the closest ones (did you mean ...?)."""

_OFFLINE = """\
environment:
  HF_HUB_OFFLINE=1          on a machine without network access: use only weights already in the Hugging Face cache
                            (pand never sets or changes it); local files: teacher.pretrained=/path/to/weights"""

_EXAMPLES_TRAIN = """\
examples:
  pand train data=cub method=vl2lite student=resnet18 trainer=gpu
  pand train experiment=pand/cub_resnet18
  pand train -m optim.lr=1e-3,3e-3          one run per value, then a table (see pand sweep --help)
  pand train trainer=ddp trainer.devices=4 data.batch_size=128
  pand train ... ckpt_path=runs/<run>/checkpoints/last.ckpt     resume an interrupted run exactly
  pand config --resolve data=cub            the composed config, interpolations resolved
  pand train ... | jq .test_acc1            the summary is the only thing on stdout"""


def _config_help(usage: str, description: str, examples: str, *, expand: Sequence[str] = (),
                 offline: bool = True, extra: str = "") -> str:
    parts = [usage, textwrap.fill(description, _WIDTH)]
    if extra:
        parts.append(extra)
    parts += [_OVERRIDES, groups_text("train"), settings_text("train", expand), examples]
    if offline:
        parts.append(_OFFLINE)
    return "\n\n".join(parts) + "\n"


def train_help() -> str:
    return _config_help(
        "usage: pand train [-m|--multirun] [OVERRIDE ...]",
        "Distil a frozen teacher into a student: train, select on val, test once. The run folder (run_dir) gets "
        "config.yaml, metrics.csv, checkpoints/{best,last}.ckpt and summary.json; the summary is printed as JSON on "
        "stdout, while logs and the progress bar go to stderr. Settings are checked before anything is loaded.",
        _EXAMPLES_TRAIN,
        extra="options:\n  -m, --multirun            anywhere among the overrides: one run per combination of the "
              "comma-separated\n                            values (as pand sweep)\n  -h, --help                "
              "this help",
    )


def config_help() -> str:
    return _config_help(
        "usage: pand config [--resolve] [OVERRIDE ...]",
        "Print the training config that `pand train` with the same overrides would run, as YAML on stdout.",
        "examples:\n  pand config data=cub method=pand\n  pand config --resolve data=cub            "
        "interpolations such as ${paths.runs_dir} resolved\n  pand config experiment=pand/cub_resnet18 | less",
        offline=False,
        extra="options:\n  --resolve                 resolve interpolations (${...}), as the run folder's "
              "config.yaml stores them\n  -h, --help                this help",
    )


def features_help() -> str:
    return _config_help(
        "usage: pand features [OVERRIDE ...]",
        "PAND stage 1: store the teacher's image embeddings of the train / val / test splits in features.dir "
        "(reused when they exist). The same config and overrides as pand train (features.* is read here only).",
        "examples:\n  pand features data=cub teacher=convnext_xxlarge\n  pand features experiment=pand/cub_resnet18",
        expand=("features",),
    )


def prompts_help() -> str:
    return _config_help(
        "usage: pand prompts [OVERRIDE ...]",
        "PAND stage 1: learn CoOp prompts on the stored teacher embeddings (made first if missing), selected on val; "
        "writes the learned text features to prompts.out, which stage 2 reads through teacher.text_features. The same "
        "config and overrides as pand train.",
        "examples:\n  pand prompts data=cub prompts.n_ctx=16 prompts.csc=false\n"
        "  pand prompts experiment=pand/cub_resnet18    then    pand train experiment=pand/cub_resnet18",
        expand=("features", "prompts"),
    )


def cache_help() -> str:
    return _config_help(
        "usage: pand cache build cache.dir=DIR cache.views=K [OVERRIDE ...]\n"
        "       pand cache verify cache.dir=DIR\n"
        "       pand cache export cache.dir=DIR out=DIR [OVERRIDE ...]\n"
        "       pand cache import src=DIR cache.dir=DIR",
        "build: store K augmented views of every training image with the teacher's output for each, in shards, so "
        "that training (the same overrides plus cache.dir=DIR) does not run the teacher. Several processes split "
        "the shards: torchrun --nproc_per_node=N, or one process per node with NODE_RANK, MASTER_ADDR and "
        "MASTER_PORT set and trainer.num_nodes=N. Prints one line describing the finished cache. verify: check "
        "every row of a cache against its digests (a copy, before it is shared). export: the cache as WebDataset "
        "tars (one sample per image: its key, augmentation parameters and teacher outputs per view), with the "
        "run's data settings to name the images. import: those tars back into a cache folder, byte-identical.",
        "examples:\n  pand cache build data=cub cache.dir=caches/cub-k10 cache.views=10\n"
        "  pand train data=cub method=vl2lite cache.dir=caches/cub-k10\n"
        "  pand cache export data=cub cache.dir=caches/cub-k10 cache.views=10 out=/shared/cub-k10-wds\n"
        "  pand cache import src=/shared/cub-k10-wds cache.dir=caches/cub-k10",
        expand=("cache",),
    )


EVAL_USAGE = ("pand eval ckpt_path=PATH|model=PATH [splits=[val,test]] [out=FILE.json] [clip_benchmark_dir=DIR] "
              "[OVERRIDE ...]")


def eval_help() -> str:
    return f"""usage: {EVAL_USAGE}

Evaluate a student checkpoint on val and test with the config stored in it; the results are printed as JSON on stdout
and written next to the checkpoint (best.eval.json for best.ckpt; or out=...). A closed-set student needs no teacher.
An open-vocabulary student (method=openvocab) also gets the report of the end of its training run, under "open_vocab":
top-1 (base / novel / HM with a class split), clip_benchmark's zero-shot metrics, class-prompt retrieval, for the
student and the teacher. For it the run's teacher is loaded: its text tower turns the class names into the
classifier. Its clip_benchmark records are also written one per file, named and shaped as clip_benchmark's own
results ({{dataset}}_{{pretrained}}_{{model}}_{{language}}_{{task}}.json), so that `clip_benchmark build` aggregates them.

options (checked before the checkpoint is loaded):
  ckpt_path=PATH            the checkpoint (e.g. runs/<run>/checkpoints/best.ckpt); this or model= is required
  model=PATH                instead of a checkpoint, what pand export wrote: student.onnx (run by onnxruntime on
                            the CPU), student.int8.onnx, student.pt2 (torch.export) or their folder, with the data
                            and seed of the student.json beside it; the same report, naming the model file, its
                            sha256 and runtime (default out: student.onnx.eval.json beside student.onnx). Overrides:
                            data.KEY=VALUE only. An open-vocabulary student is scored on its exported classes only
  splits=[val,test]         the splits to evaluate: [val,test], [val] or [test]
  out=FILE.json             where to write the results (default: next to the checkpoint, best.eval.json for best.ckpt)
  clip_benchmark_dir=DIR    open-vocabulary students: the folder of the clip_benchmark files (default: beside the
                            results, best.clip_benchmark/ for best.eval.json)
  KEY=VALUE                 overrides of single settings of the checkpoint's config, e.g. data.root=/new/place
                            data.batch_size=256 (a group such as data=cub cannot change: the checkpoint fixes it)

examples:
  pand eval ckpt_path=runs/cub-vl2lite-resnet18-20250101-120000/checkpoints/best.ckpt
  pand eval ckpt_path=best.ckpt splits=[test] data.root=/data/CUB_200_2011 | jq .test_acc1
  pand eval ckpt_path=runs/<openvocab run>/checkpoints/best.ckpt clip_benchmark_dir=results/ | jq .open_vocab.student
  pand eval model=exported/student.onnx splits=[test] | jq .test_acc1      the number of the file that ships
"""


PREDICT_USAGE = ("pand predict ckpt_path=PATH|model=PATH images=FILE|DIR|GLOB [topk=5] [classes=[a,b]|classes_file=F] "
                 "[out=F.csv|F.json]")


def predict_help() -> str:
    return f"""usage: {PREDICT_USAGE}

The top-k classes of image files; an open-vocabulary student takes any class names. The predictions are printed as
JSON on stdout (with out=..., a table goes to stderr and the file is written).

options (checked before the model is loaded):
  ckpt_path=PATH            a student checkpoint, or what pand export wrote (student.onnx, student.int8.onnx,
                            student.pt2 or their folder: run on the CPU, its classes fixed); required
  model=PATH                the same as ckpt_path=
  images=FILE|DIR|GLOB      the images; required
  topk=5                    classes per image (an integer >= 1)
  classes=[a,b] | classes_file=F    the class names (open-vocabulary students); F: a UTF-8 text file, one per line
  out=F.csv | F.json        write the predictions to a file (text cells a spreadsheet would run as a formula, such
                            as =..., get a leading ' in the CSV; the JSON keeps the names exactly)
  batch_size=64             images per batch (>= 1)
  num_workers=0             image-decoding processes (>= 0; 0: in the main process)
  device=auto               auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps

example:
  pand predict ckpt_path=runs/<run>/checkpoints/best.ckpt images='photos/*.jpg' topk=3
  pand predict model=exported/student.onnx images=photos/ out=preds.csv
"""


EXPORT_USAGE = ("pand export ckpt_path=PATH format=onnx|torch_export|safetensors|open_clip|timm out=DIR "
                "[class_names=a,b,...] [text_tower=teacher|DIR] [quantize=int8 [calibration=N] "
                "[calibration_method=minmax|percentile|entropy]]")


def export_help() -> str:
    return f"""usage: {EXPORT_USAGE}

The student alone, for use without pand, with student.json (preprocessing, classes) beside it; the result is printed
as JSON on stdout.

options (checked before the model is loaded):
  ckpt_path=PATH            a student checkpoint; required
  format=onnx|torch_export|safetensors|open_clip|timm    required (onnx needs pip install pand[export]; open_clip:
                            an open-vocabulary student with method.head=linear, as a folder open_clip loads with
                            open_clip.create_model_and_transforms('local-dir:DIR'); timm: a timm student, or a
                            torchvision one timm has (ResNets, DenseNets, mobilenet_v2), as a folder timm loads with
                            timm.create_model('local-dir:DIR', pretrained=True), class names and preprocessing in
                            its config.json)
  out=DIR                   the output folder, created if missing; required
  class_names=a,b,...       another vocabulary for an open-vocabulary student (or a .txt file with one name per line)
  text_tower=teacher|DIR    format=open_clip: the text tower that goes out, the teacher's (default) or the smaller
                            one `pand teacher text-tower` distilled from it into DIR (refused if made for another
                            teacher); student.json records which, with its agreement with the teacher's
  quantize=int8             format=onnx: also write student.int8.onnx, quantized by ONNX Runtime (QDQ: int8 weights
                            per output channel, uint8 activations per tensor); student.json describes it, names the
                            operators left float and the int8 model's agreement with the float one
  calibration=N             training images (evaluation preprocessing, seeded) that set the activation ranges (512)
  calibration_method=minmax|percentile|entropy   how ranges are read from them (minmax)

examples:
  pand export ckpt_path=runs/<run>/checkpoints/best.ckpt format=onnx out=exported/
  pand export ckpt_path=runs/<run>/checkpoints/best.ckpt format=onnx quantize=int8 calibration=512 out=int8/
  pand export ckpt_path=runs/<run>/checkpoints/best.ckpt format=open_clip out=oc/ text_tower=runs/<run>/text_tower
  pand export ckpt_path=runs/<run>/checkpoints/best.ckpt format=timm out=timm/
"""


TEACHER_USAGE = ("pand teacher fit [--out PATH] [--epochs N] [--seed S] ... | pand teacher text-tower ckpt_path=PATH "
                 "out=DIR [OPTION=VALUE ...]   (pand teacher fit --help, pand teacher text-tower --help: all options)")


def teacher_help() -> str:
    return ("usage: pand teacher fit [--out PATH] [--epochs N] [--seed S] ...   (pand teacher fit --help: all options)\n"
            "       pand teacher text-tower ckpt_path=PATH out=DIR [OPTION=VALUE ...]   (pand teacher text-tower "
            "--help)\n\n"
            "fit         re-fit the compact Fashion-MNIST CLIP teacher that the quickstart ships with\n"
            "text-tower  distil a small text tower from the teacher of an open-vocabulary run, and report how often "
            "the\n            student's zero-shot predictions with it agree with those with the teacher's text tower\n")


TEXT_TOWER_USAGE = ("pand teacher text-tower ckpt_path=PATH out=DIR [width=N] [heads=N] [layers=N] [steps=2000] "
                    "[batch_size=256] [lr=1e-3] [corpus=FILE] [seed=0] [device=auto] [warm_start=true] "
                    "[contrastive_weight=1] [temperature=T] [data.KEY=VALUE ...]")


def text_tower_help() -> str:
    return f"""usage: {TEXT_TOWER_USAGE}

Distil the text tower of an open-vocabulary run's teacher (method=openvocab) into a small open_clip TextTransformer
that tokenizes like the teacher and embeds in its space, then report, on the run's val and test images, how often the
student's zero-shot argmax with it is the one with the teacher's text tower (all classes; base and novel apart in a
base-to-novel run), the student's top-1 with each, and the cosine of the two towers' class embeddings. Writes
DIR/text_tower.safetensors and DIR/text_tower.json (the record, also printed as JSON on stdout); `pand export
format=open_clip text_tower=DIR` exports the student with it.

Training texts: the run's templates with its training classes (base classes only with a class split), the training
captions if any, the words of the teacher tokenizer's vocabulary in the templates (every word of a held-out class name
removed), and corpus=FILE; one text in 20 is val, on which the tower is selected (never on images).

options (checked before the checkpoint is loaded):
  ckpt_path=PATH            a checkpoint of an open-vocabulary run (its teacher is loaded as its config says); required
  out=DIR                   the folder to write, created if missing; required
  width=N heads=N layers=N  the tower's size (default: half the teacher's text width, at most 256; a head per 64
                            channels; half its layers, 1 to 4)
  steps=2000                optimisation steps (>= 1)
  batch_size=256            texts per step (>= 1)
  lr=1e-3                   AdamW's peak learning rate (> 0; warm-up, then cosine)
  corpus=FILE               more training texts, one per line (UTF-8)
  seed=0                    initialisation and batch order (>= 0)
  device=auto               auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps
  warm_start=true           start the token and position embeddings from the teacher's (projected to the width)
  contrastive_weight=1      weight of the in-batch InfoNCE between the tower's and the teacher's embeddings (>= 0)
  temperature=T             its temperature (> 0; default: 1 / the teacher's learned logit scale)
  data.KEY=VALUE            a change to the run's data section, rebuilt from the checkpoint (data.root=/new/place
                            where the data moved)

example:
  pand teacher text-tower ckpt_path=runs/<run>/checkpoints/best.ckpt out=runs/<run>/text_tower
"""


HELP = {
    "train": train_help,
    "config": config_help,
    "features": features_help,
    "prompts": prompts_help,
    "cache": cache_help,
    "eval": eval_help,
    "predict": predict_help,
    "export": export_help,
    "teacher": teacher_help,
}
