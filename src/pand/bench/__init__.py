"""``pand bench``: milliseconds per training step of the student alone and of distillation with the teacher online
or cached, measured side by side in one process on the same batches.

Every configuration runs the same full step (teacher outputs, distiller losses, backward, optimizer step) on the same
synthetic batches, in round-robin order so that drift of the machine affects all alike; the median is reported. Models
have random weights (nothing is downloaded). The one-time cost of building the cache is the teacher's forward pass,
reported in the same units (``teacher_forward_ms`` per batch of views; a cache of K views costs K of them per batch).

``--zoo`` adds the heterogeneous-distillation methods with a classifier teacher (``--zoo-teacher``, a timm or
torchvision name, random weights): the student alone, then KD, KD + LS, DKD, OFA, NRKD and PAT with the teacher live,
and the logit methods from a cache of the teacher's logits. NRKD's feature term and PAT cannot use a cache; PAT runs
the teacher twice per step (plain, then prompted with gradients), which its row shows.

``--latency`` measures inference instead of training: the student (``--student`` at ``--image-size``, classifier
logits) and the CLIP teacher's image tower (``--teacher`` at its own input size or ``--teacher-image-size``,
``encode_images``) under ``torch.inference_mode()``, at every batch size of ``--latency-batches``, round-robin over
models and batch sizes, inputs already on the device. It reports the median milliseconds per batch, images/s,
parameters, forward FLOPs per image (``torch.utils.flop_counter``, one batch-1 forward) and teacher ms / student ms.
``--latency`` replaces the training-step table (it does not add to it); ``--zoo`` and ``--loader`` still add their
parts when given with it, so the training-step table needs a second run without ``--latency``. With
``--latency --latency-batches 32,256`` its student rows give what a larger ``data.eval_batch_size`` gains. On the CPU it
also times the student as it ships (:mod:`pand.bench.exported`): exported to ONNX and quantized to int8 in the run,
under ONNX Runtime with the same threads, next to PyTorch eager, with the files' sizes and the CPU's instruction sets
that matter for int8 (VNNI, AMX); ``--no-exported`` leaves them out.

``--parallel`` adds the student's training images/s (cross-entropy steps on the CPU) in one process with a thread per
core, next to one process per core (at most 4) running the same steps side by side: what ``--jobs`` of
``pand quickstart`` and ``pand sweep`` gain for small students, whose steps leave cores idle.
"""

from __future__ import annotations

import argparse
import json

from pand.arguments import ArgumentParser
from pand.rules import check_rules, device_errors, integer, raise_option_errors


def _parse_batches(text: str) -> list[int]:
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = []
    if not batches or min(batches) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive batch sizes such as 1,32, got {text!r}")
    return list(dict.fromkeys(batches))


def parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="pand bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="ViT-B-16", help="open_clip model (random weights unless --pretrained)")
    p.add_argument("--pretrained", default=None, help="teacher weights (default: random, nothing downloaded)")
    p.add_argument("--student", default="resnet18")
    p.add_argument("--image-size", type=int, default=64, help="the student's input size")
    p.add_argument("--teacher-image-size", type=int, default=None,
                   help="teacher input size (default: --image-size for the training steps, where the teacher sees "
                        "the student's image; the teacher's own size for --latency)")
    p.add_argument("--batch", type=int, default=32, help="batch of the training steps")
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--steps", type=int, default=8,
                   help="measured steps per configuration (per model and batch size with --latency)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--loader", action="store_true",
                   help="also measure the data loader: images/s of each view path (augment_on=cpu / device), JPEG and "
                        "decoded cache, next to the student's training images/s at --image-size and --batch")
    p.add_argument("--loader-images", type=int, default=256)
    p.add_argument("--loader-workers", type=int, default=2)
    p.add_argument("--zoo", action="store_true",
                   help="also time kd, kd+LS, dkd, ofa, nrkd and pat with a classifier teacher, live and cached")
    p.add_argument("--zoo-teacher", default="resnet50", help="classifier teacher of --zoo (timm / torchvision name)")
    p.add_argument("--latency", action="store_true",
                   help="time inference instead of training: the student and the teacher's image tower at each "
                        "--latency-batches size (ms, images/s, params, FLOPs, teacher/student). Replaces the "
                        "training-step table; --zoo and --loader still add theirs")
    p.add_argument("--latency-batches", type=_parse_batches, default="1,32",
                   help="comma-separated batch sizes of --latency (default 1,32)")
    p.add_argument("--no-exported", dest="exported", action="store_false",
                   help="--latency without the rows of the student as it ships (ONNX Runtime float32 and int8, "
                        "exported and quantized in the run; CPU only)")
    p.add_argument("--parallel", action="store_true",
                   help="also measure the student's training images/s in one process with every core against one "
                        "process per core side by side (what --jobs of pand quickstart and pand sweep do)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _rules() -> dict:
    return {
        "--image-size": integer(1),
        "--teacher-image-size": integer(1),
        "--batch": integer(1),
        "--classes": integer(1),
        "--steps": integer(1),
        "--warmup": integer(0),
        "--threads": integer(1),
        "--loader-images": integer(1),
        "--loader-workers": integer(0),
    }


def check_args(args: argparse.Namespace) -> None:
    """Refuse values out of range (argparse checks their types only) and a device this machine lacks, before torch is
    imported for the measurements; one line per problem, as for pand's other commands."""

    rules = _rules()
    values = {flag: getattr(args, flag[2:].replace("-", "_")) for flag in rules}
    values = {flag: value for flag, value in values.items() if value is not None}  # not given: the default applies
    errors = check_rules(values, rules) + device_errors("--device", args.device)
    if args.loader and args.image_size == 1:
        # the loader times training views, whose blur needs 2 pixels (pand.engine.config_checks._image_size_errors)
        errors.append("--image-size=1 is too small for --loader: the blur of the training views needs an image of 2 "
                      "pixels or more")
    raise_option_errors(errors)


def main_bench(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    check_args(args)
    from pand.bench.measure import print_result, run_bench

    result = run_bench(args)
    if args.json:
        print(json.dumps(result))
    else:
        print_result(result)
    return 0
