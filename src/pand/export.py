"""A trained student on its own, for use without pand: ``pand export ckpt_path=... format=... out=DIR``.

Five formats, each written with ``student.json`` beside it (what it is, how to feed it, where it came from):

* ``onnx`` (``student.onnx``): the eval-mode model through ``torch.onnx.export``; input ``image`` (N x 3 x H x W
  float32, normalised as ``preprocessing`` says), output ``logits`` (N x C). Checked with onnxruntime before it is
  written.
* ``torch_export`` (``student.pt2``): a ``torch.export`` program (``torch.export.load(path).module()(x)``), checked
  against the model before it is written.
* ``safetensors`` (``student.safetensors``): the weights under the original library's key names, so that
  ``torchvision.models.get_model(name, num_classes=C)`` or ``timm.create_model(name, num_classes=C, **kwargs)``
  loads them with ``strict=True``: the backbone's keys as they are (``backbone.X`` -> ``X``) and ``linear_cls`` under
  the library's classifier (``fc``, ``classifier.1``, ``heads.head``, ``head.fc``, ...: ``Student.head_name``).
  An open-vocabulary student has no such classifier: its file holds its own state dict
  (:data:`OPEN_VOCAB_KEYS`), loadable into :class:`~pand.students.open_vocab.OpenVocabStudent`, not into a plain
  library model.
* ``open_clip`` (``open_clip_config.json``, ``open_clip_model.safetensors``, a Hugging Face tokenizer's files if the
  teacher has one): an open-vocabulary student as a folder that open_clip itself loads,
  ``open_clip.create_model_and_transforms("local-dir:DIR")`` and ``open_clip.get_tokenizer("local-dir:DIR")``:
  ``encode_image`` is the student (its backbone as a timm trunk, its ``method.head=linear`` as the trunk's
  projection), ``encode_text`` the run's teacher's (or, with ``text_tower=DIR``, the smaller tower ``pand teacher
  text-tower`` distilled from it), the tokenizer the teacher's, ``logit_scale`` the run's. Students open_clip
  cannot express (other heads, fusion, CIFAR networks, torchvision models without a timm twin) are refused with the
  reason; the folder is loaded by open_clip and its similarities compared with pand's (1e-5) before it is written
  (:mod:`pand.export_open_clip`).
* ``timm`` (``config.json``, ``model.safetensors``): a closed-set student as a folder that timm's own factory loads,
  ``timm.create_model("local-dir:DIR", pretrained=True)``: ``config.json`` names the timm architecture, its
  ``model_args``, the run's class names (``label_names``) and its eval preprocessing (``pretrained_cfg``), the
  weights are under timm's keys. A timm student is its own architecture; a torchvision one its timm twin (ResNets,
  ResNeXts, Wide ResNets, DenseNets, MobileNetV2); others (pand's CIFAR networks and ``pand_*`` models, torchvision
  models without a twin, open-vocabulary students) are refused with the reason and the format to use. The folder is
  loaded by timm and its logits compared with pand's (1e-5) before it is written (:mod:`pand.export_timm`).

A batch dimension that stays dynamic is checked at other batch sizes than the example's; a model that cannot be
exported with one is exported for a fixed batch of 1 instead, and ``student.json`` says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import pand
from pand.deploy import load_student, preprocessing
from pand.engine.run import evaluate_exported, is_first_process
from pand.errors import ConfigError
from pand.export_int8 import DEFAULT_CALIBRATION, INT8_SUFFIX, calibration_images, quantize_onnx
from pand.export_open_clip import WEIGHTS_NAME as OPEN_CLIP_WEIGHTS
from pand.export_open_clip import load_for_open_clip, with_text_tower, write_open_clip
from pand.export_programs import EXAMPLE_BATCH, FIXED_BATCH, INPUT_NAME, OUTPUT_NAME, write_onnx, write_torch_export
from pand.export_timm import WEIGHTS_NAME as TIMM_WEIGHTS
from pand.export_timm import write_timm
from pand.io import atomic_write_bytes, atomic_write_json, file_sha256, mark_output_folder
from pand.networks.backbones import resolve_source
from pand.networks.cifar import create_cifar_model
from pand.networks.timm_models import create_timm_sized
from pand.rules import EXPORT_FORMATS, TEACHER_TEXT_TOWER, validate_export_options

log = logging.getLogger("pand")

FORMATS = EXPORT_FORMATS
FILE_NAMES = {"onnx": "student.onnx", "torch_export": "student.pt2", "safetensors": "student.safetensors",
              "open_clip": OPEN_CLIP_WEIGHTS, "timm": TIMM_WEIGHTS}
METADATA_NAME = "student.json"

OPEN_VOCAB_KEYS = (
    "OpenVocabStudent.state_dict() as is: 'backbone.<key>' where <key> is the library model's own key (the model "
    "built with num_classes=0, i.e. without its classifier), 'head.*' the projection into the teacher's embedding "
    "space, 'fusion.*' the text fusion if any, 'logit_scale', 'vocabulary' (C x D class text matrix, rows "
    "L2-normalised) and, for cross-attention fusion, 'vocabulary_tokens' and 'vocabulary_mask'"
)

# Exported weights are compared with the student's; a real export error is far larger than this.
_ATOL, _RTOL = 1e-3, 1e-3


def export_student(ckpt_path: str | os.PathLike, fmt: str, out_dir: str | os.PathLike,
                   class_names: Sequence[str] | None = None,
                   text_tower: str | os.PathLike = TEACHER_TEXT_TOWER, quantize: str | None = None,
                   calibration: int = DEFAULT_CALIBRATION, calibration_method: str = "minmax") -> dict[str, Any]:
    """Export the student of ``ckpt_path`` as ``fmt`` (``onnx``, ``torch_export``, ``safetensors``, ``open_clip`` or
    ``timm``) into ``out_dir``, with ``student.json`` beside it.

    ``class_names`` gives an open-vocabulary student another vocabulary (computed with the run's teacher), as in
    :func:`pand.deploy.load_student`. ``text_tower`` (``open_clip`` only): ``"teacher"`` exports the teacher's text
    tower, a folder written by ``pand teacher text-tower`` the smaller tower distilled from it (which then also makes
    the vocabulary). ``quantize="int8"`` (``onnx`` only) also writes ``student.int8.onnx``, quantized with
    ``calibration`` training images (:mod:`pand.export_int8`); ``student.json`` then describes the int8 file, and
    names the float one under ``quantization.float_file``. Returns ``{"format", "files": [model file(s),
    student.json], "student": the contents of student.json}``.
    """
    validate_export_options({"ckpt_path": ckpt_path, "format": fmt, "out": out_dir, "class_names": class_names,
                             "text_tower": text_tower, "quantize": quantize, "calibration": calibration,
                             "calibration_method": calibration_method})
    out = Path(out_dir).expanduser().absolute()
    created = not out.exists()  # marked only when pand makes it: out may name a folder of the user's

    ckpt_path = Path(ckpt_path)
    teacher = tower = None
    if fmt == "open_clip":
        loaded, teacher = load_for_open_clip(ckpt_path, class_names)
        if text_tower not in (None, TEACHER_TEXT_TOWER):
            tower = with_text_tower(loaded, teacher, text_tower)
    else:
        loaded = load_student(ckpt_path, class_names)
    model = loaded.model.cpu().eval()
    config = loaded.config
    pp = preprocessing(config)
    side = pp["image_size"]
    open_vocab = hasattr(model, "vocabulary")

    meta: dict[str, Any] = {
        "format": fmt,
        "file": FILE_NAMES[fmt],
        "input": {"name": INPUT_NAME, "shape": ["N", 3, side, side], "dtype": "float32",
                  "note": "RGB images prepared as 'preprocessing' says"},
        "output": {"name": OUTPUT_NAME, "shape": ["N", len(loaded.class_names)], "dtype": "float32"},
        "preprocessing": pp,
        "class_names": list(loaded.class_names),
        "architecture": _architecture(model, config, len(loaded.class_names)),
        "pand_version": pand.__version__,
        "checkpoint": {"path": str(ckpt_path.absolute()), "sha256": file_sha256(ckpt_path)},
        # the run's data section and seed: `pand eval model=<exported file>` rebuilds the same splits from them
        "data": config["data"],
        "seed": int(config.get("seed", 0)),
    }
    if open_vocab:
        meta["open_vocabulary"] = _open_vocab_record(model, config)

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(EXAMPLE_BATCH, 3, side, side, generator=generator)
    path = out / FILE_NAMES[fmt]
    files = [path]
    if fmt == "open_clip":
        files, info = write_open_clip(model, teacher, config, loaded.class_names, out, tower)
        meta.update(info)
        meta["files"] = [p.name for p in files]
        meta["output"] = {"name": "encode_image", "shape": ["N", int(model.embed_dim)], "dtype": "float32",
                          "note": "image embeddings; with open_clip's encode_text of the class prompts, "
                                  "logits = logit_scale.exp() * normalised image @ normalised text matrix.T"}
        meta["open_vocabulary"]["note"] = ("text_matrix is the run's classes' (prompt-template ensemble, with the "
                                           f"{'distilled' if tower is not None else 'teacher'}'s text tower that went "
                                           "out); the folder's encode_text and tokenizer make the text matrix of any "
                                           "names")
    elif fmt == "timm":
        files, info = write_timm(model, config, loaded.class_names, out, library_state_dict)
        meta.update(info)
        meta["files"] = [p.name for p in files]
    elif fmt == "safetensors":
        meta.update(_write_safetensors(model, meta["architecture"], path, example))
    elif fmt == "onnx":
        meta.update(write_onnx(model, path, example))
        if quantize == "int8":
            int8 = path.with_name(path.name[:-len(".onnx")] + INT8_SUFFIX)
            batches = calibration_images(config, int(calibration))
            meta["quantization"] = quantize_onnx(path, int8, batches, method=calibration_method,
                                                 input_name=INPUT_NAME,
                                                 fixed_batch=None if meta["dynamic_batch"] else FIXED_BATCH)
            meta["quantization"]["bytes"] = {"float": path.stat().st_size, "int8": int8.stat().st_size}
            meta["file"] = int8.name
            files.insert(0, int8)
    else:
        meta.update(write_torch_export(model, path, example))
    if meta.get("dynamic_batch") is False:
        meta["input"]["shape"][0] = meta["output"]["shape"][0] = meta["batch_size"]
    json_path = atomic_write_json(out / METADATA_NAME, meta)
    if created:  # an exported model, never to be walked as input images
        mark_output_folder(out, "export")
    return {"format": fmt, "files": [*(str(p) for p in files), str(json_path)], "student": meta}


# -- metadata ------------------------------------------------------------------------------------------------------
def _architecture(model: nn.Module, config: dict[str, Any], num_classes: int) -> dict[str, Any]:
    s = config["student"]
    source = resolve_source(s["name"], s.get("source", "auto"))
    head = getattr(model, "head_name", None)
    return {"source": source, "name": s["name"], "kwargs": dict(s.get("kwargs") or {}),
            "image_size": int(config["data"]["image_size"]), "num_classes": int(num_classes),
            "head_name": list(head) if isinstance(head, tuple) else head,
            "kind": "open_vocabulary" if hasattr(model, "vocabulary") else "closed_set"}


def _open_vocab_record(model: nn.Module, config: dict[str, Any]) -> dict[str, Any]:
    fused = model.fusion is not None
    formula = ("logits[n, c] = logit_scale * e(x_n | t_c) . t_c, e(x | t) the L2-normalised image embedding after "
               "the fusion conditioned on the class text t_c" if fused else
               "logits = logit_scale * e @ text_matrix.T, e the L2-normalised image embedding (N x D)")
    record = {
        "text_matrix": model.vocabulary.detach().float().cpu().tolist(),
        "text_matrix_shape": list(model.vocabulary.shape),
        "logit_scale": float(model.logit_scale),
        "logits_formula": formula,
        "fusion": model.fusion_kind,
        "head": model.head_kind,
        "embed_dim": int(model.embed_dim),
        "teacher": {k: (config.get("teacher") or {}).get(k) for k in ("model", "pretrained")},
        "note": "the vocabulary is fixed in the exported model; re-export with class_names=... for other classes",
    }
    if model.vocabulary_tokens is not None:
        record["note"] += "; cross-attention also fixes the classes' per-token text features (in the weights)"
    return record


# -- safetensors ---------------------------------------------------------------------------------------------------
def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # Weights live on as float32 whatever the training precision; safetensors wants contiguous, unshared storage.
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        tensor = tensor.float()
    return tensor.contiguous().clone()


def library_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A closed-set student's weights under the library model's key names (``backbone.X`` -> ``X``, ``linear_cls``
    -> ``<head_name>``); an open-vocabulary student's own state dict (:data:`OPEN_VOCAB_KEYS`)."""
    if hasattr(model, "vocabulary"):
        return {k: _plain(v) for k, v in model.state_dict().items()}
    head = getattr(model, "head_name", None)
    if not head:
        raise ConfigError(f"pand does not know where the library model {model.name!r} keeps its classifier, so its "
                          "weights cannot be written under the library's key names; export format=onnx or "
                          "format=torch_export instead")
    state = {k: _plain(v) for k, v in model.backbone.state_dict().items()}
    for name in (head,) if isinstance(head, str) else head:
        for part in ("weight", "bias"):
            key = f"{name}.{part}"
            if key in state:
                raise ConfigError(f"the backbone of {model.name!r} already has a weight {key!r}: the classifier "
                                  "cannot be written there")
            # Distilled two-head timm models average their heads: the same classifier in both gives its logits.
            state[key] = _plain(getattr(model.linear_cls, part))
    return state


def _library_model(arch: dict[str, Any]) -> tuple[nn.Module, str, dict[str, Any]]:
    """The plain library model the weights are meant for, the call that builds it, and that call's keyword args."""
    source, name, num_classes = arch["source"], arch["name"], arch["num_classes"]
    kwargs = dict(arch["kwargs"])
    if source == "torchvision":
        import torchvision

        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
        return model, f"torchvision.models.get_model({name!r}, num_classes={num_classes}{_call_args(kwargs)})", kwargs
    if source == "timm":
        # pand builds patch models (ViT, Mixer, Swin) for the run's size, as the student was built
        model, used = create_timm_sized(name, pretrained=False, num_classes=num_classes,
                                        image_size=arch["image_size"], kwargs=kwargs)
        return model, f"timm.create_model({name!r}, num_classes={num_classes}{_call_args(used)})", used
    if source == "cifar":
        return (create_cifar_model(name, num_classes=num_classes),
                f"pand.students.cifar.create_cifar_model({name!r}, num_classes={num_classes})", {})
    raise ConfigError(f"unknown student source {source!r}")


def _call_args(kwargs: dict[str, Any]) -> str:
    return "".join(f", {k}={v!r}" for k, v in kwargs.items())


def _library_check(model: nn.Module, arch: dict[str, Any], state: dict[str, torch.Tensor],
                   example: torch.Tensor) -> dict[str, Any]:
    """Build the plain library model, load the weights strictly and compare its logits with the student's."""
    try:
        library, call, kwargs = _library_model(arch)
        library.load_state_dict(state, strict=True)
        library.eval()
        with torch.no_grad():
            want = model(example)
            diff = (library(example) - want).abs().max().item()
    except Exception as err:  # noqa: BLE001 - any failure means the file does not load there, which is reported
        log.warning("the exported weights of %s do not load into the plain %s model: %s", arch["name"],
                    arch["source"], str(err).splitlines()[0] if str(err) else type(err).__name__)
        return {"loads_into_library": False, "library_error": str(err).splitlines()[0] if str(err) else repr(err)}
    load: dict[str, Any] = {"library": arch["source"], "call": call, "kwargs": kwargs, "strict": True,
                            "max_abs_logit_diff": diff}
    if arch["source"] == "timm" and arch["name"].startswith("pand_"):
        load["requires"] = "import pand.students (registers pand's pand_* models in timm)"
    if arch["source"] == "cifar":
        load["requires"] = "pand (its CIFAR networks are not in torchvision or timm)"
    ok = diff <= _ATOL + _RTOL * want.abs().max().item()
    if not ok:
        log.warning("the plain %s model loads the exported weights but its logits differ by %.3g", arch["source"], diff)
    return {"loads_into_library": bool(ok), "load": load}


def _write_safetensors(model: nn.Module, arch: dict[str, Any], path: Path, example: torch.Tensor) -> dict[str, Any]:
    from safetensors.torch import save

    state = library_state_dict(model)
    if hasattr(model, "vocabulary"):
        info: dict[str, Any] = {"keys": OPEN_VOCAB_KEYS, "loads_into_library": False,
                                "library_note": "an open-vocabulary student has a projection head and a vocabulary, "
                                                "not a linear classifier: it does not load into a plain torchvision "
                                                "or timm model (its 'backbone.' keys, without the prefix, load into "
                                                "one built with num_classes=0)"}
    else:
        info = {"keys": "the library model's own names: backbone.X -> X, linear_cls.{weight,bias} -> "
                        f"{arch['head_name']}.{{weight,bias}}"}
        info.update(_library_check(model, arch, state, example))
    header = {"format": "pt", "pand_version": pand.__version__, "architecture": arch["name"]}
    atomic_write_bytes(path, save(state, metadata=header))
    info["tensors"] = len(state)
    return info


# -- the end of a quantization-aware run --------------------------------------------------------------------------
INT8_FOLDER = "int8"


def ship_int8(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """After ``pand train ... quantize=qat`` (with ``quantize.export``): its selected checkpoint exported as the int8
    ONNX model (``<run_dir>/int8``, as ``pand export format=onnx quantize=int8`` would) and, if the run tests, that
    file's test top-1 under ONNX Runtime, the number that ships. Added to ``summary.json`` under ``int8``; returns the
    summary."""
    q = config.get("quantize") or {}
    if (q.get("name") != "qat" or not q.get("export", True) or summary.get("status") != "done"
            or not is_first_process()):
        return summary
    run_dir = Path(summary["run_dir"])
    exported = export_student(summary["best_checkpoint"], "onnx", run_dir / INT8_FOLDER, quantize="int8",
                              calibration=int(q.get("calibration", DEFAULT_CALIBRATION)))
    model = Path(exported["files"][0])
    record: dict[str, Any] = {"file": str(model), "bytes": exported["student"]["quantization"]["bytes"]}
    if config.get("test", True) and summary.get("test_acc1") is not None:
        results = evaluate_exported(model, splits=("test",))
        record.update(test_acc1=results.get("test_acc1"), test_acc5=results.get("test_acc5"),
                      simulated_test_acc1=summary["test_acc1"])
        log.info("int8 model %s: test top-1 %.2f %% under ONNX Runtime (%.2f %% simulated in training)", model,
                 100 * record["test_acc1"], 100 * summary["test_acc1"])
    summary = {**summary, "int8": record}
    atomic_write_json(run_dir / "summary.json", summary)
    return summary
