"""``pand export format=open_clip``: an open-vocabulary student as a folder that open_clip itself loads.

The folder holds what open_clip's ``local-dir:`` schema reads (``open_clip.factory.create_model`` and
``get_tokenizer``): ``open_clip_config.json`` with ``model_cfg`` and ``preprocess_cfg``, the weights as
``open_clip_model.safetensors`` (the first name open_clip looks for in the folder) and, for a Hugging Face tokenizer,
its files; ``student.json`` lies beside them. Then, without pand::

    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
    model.eval()
    tokenizer = open_clip.get_tokenizer("local-dir:DIR")

``encode_image`` is the student: its backbone as open_clip's timm trunk (``timm_model_name``) and its projection as
the trunk's ``timm_proj: linear`` with ``timm_proj_bias: true``. ``encode_text`` is the run's teacher's text tower
(the teacher's own text config, its weights copied) or, with ``text_tower=DIR``, a smaller tower distilled from it
by ``pand teacher text-tower`` (its ``text_cfg`` and weights; refused when it was distilled from another teacher,
:mod:`pand.teachers.text_tower`); the tokenizer is the teacher's, and ``logit_scale`` (a log, as open_clip keeps it)
the scale of the run's logits, ``teacher.logit_scale``.

What open_clip can express decides what is exported:

* the head: open_clip's timm tower pools the trunk's last feature map with the timm model's own pooling, then
  applies ``timm_proj``: nothing, dropout and a Linear (``linear``), or timm's ``Mlp`` (Linear to 2D, GELU, Linear).
  ``method.head=linear`` (dropout, then a Linear with bias on the pooled feature) is exactly the second.
  ``head=conv`` applies a ReLU at every position before pooling, and ``head=mlp`` a ReLU between its layers; no
  tower has a ReLU there (a BatchNorm folds into a Linear, and a hidden width of D into open_clip's 2D with zero rows,
  but a ReLU is not a GELU), so both are refused.
* fusion: a text-conditioned image embedding is not a CLIP model's ``encode_image``; refused.
* the backbone: open_clip builds its trunk with ``timm.create_model(timm_model_name)`` and passes timm only a
  drop-path rate, a patch-drop rate and the pooling; never an input size. A timm student is its own
  ``timm_model_name`` when it was built with no other ``student.kwargs`` and, for a patch model (ViT, Mixer, Swin),
  at the model's default input size. A torchvision student is the timm model of the same name where both have the
  same state-dict keys and compute the same function (:data:`TORCHVISION_IN_TIMM`; checked with random weights and
  batch-norm statistics, the outputs agree exactly). pand's CIFAR networks (3x3 stem, no max-pool) and its ``pand_*``
  timm models exist in neither library for open_clip to build; refused.
* the preprocessing: open_clip's eval transform resizes the short side to the crop size and centre-crops, with
  bicubic or bilinear resampling of a PIL image. pand's resizes the short side to ``data.resize_size`` first; when
  that is larger than ``data.image_size`` open_clip cannot say so, and ``preprocess_cfg`` is the closest it can
  express (``student.json`` says so, and holds pand's exact preprocessing).

Before anything is written, the folder is assembled in a temporary folder next to the output, built from there by
open_clip's own factory and tokenizer, and compared with pand: the tokens of the run's class prompts, and the cosine
similarities of random images (open_clip's normalised ``encode_image``) with the classes' text embeddings (open_clip's
prompt-ensemble classifier of its ``encode_text``) against the student's embeddings with the class embeddings of the
text tower that goes out. A similarity that differs by more than 1e-5 refuses the export, and nothing is written.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from pand.data.transforms import eval_transform
from pand.deploy import LoadedStudent, load_student, preprocessing
from pand.errors import ConfigError, PandError
from pand.io import atomic_write_with
from pand.networks.backbones import natural_size, resolve_source
from pand.networks.timm_twins import TORCHVISION_IN_TIMM
from pand.rules import TEACHER_TEXT_TOWER
from pand.teachers.clip import ClipTeacher, register_model_configs
from pand.teachers.registry import load_teacher
from pand.teachers.text_tower import DistilledTextTower, load_text_tower, param_count

log = logging.getLogger("pand")

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
SIMILARITY_ATOL = 1e-5

#: student.kwargs of a timm student that open_clip's vision_cfg hands on to timm, and the vision_cfg key for each.
TIMM_KWARGS = {"drop_path_rate": "timm_drop_path", "patch_drop_rate": "patch_dropout", "global_pool": "timm_pool"}

_CHECK_IMAGES = 4
_FIX_HEAD = "train the student with method.head=linear (and method.fusion=none)"


def _refusal(reason: str) -> ConfigError:
    return ConfigError(f"format=open_clip cannot express this student: {reason}; nothing was written")


# -- loading -------------------------------------------------------------------------------------------------------
def _refuse_image_tower(loaded: LoadedStudent) -> None:
    vision_tower(loaded.model, loaded.config)


def load_for_open_clip(ckpt_path: Path, class_names: Sequence[str] | None, *,
                       check: Callable[[LoadedStudent], None] = _refuse_image_tower,
                       refusal: Callable[[str], PandError] = _refusal) -> tuple[LoadedStudent, ClipTeacher]:
    """The student and the run's teacher. ``check`` refuses a student before the teacher loads (by default one
    open_clip cannot express); ``refusal`` makes the error of a teacher without an open_clip text tower."""
    loaded = load_student(ckpt_path)
    check(loaded)
    teacher = load_teacher(loaded.config, device="cpu")
    if not isinstance(teacher, ClipTeacher):
        raise refusal(f"its teacher is a {type(teacher).__name__}, not an open_clip model with a text tower")
    if class_names is not None:
        loaded = load_student(ckpt_path, class_names, teacher=teacher)
    return loaded, teacher


# -- the image tower -----------------------------------------------------------------------------------------------
def vision_tower(model: nn.Module, config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """open_clip's ``vision_cfg`` for the student, its ``visual.*`` weights, and where the trunk's name comes from.
    Raises :class:`ConfigError` naming the reason and the fix when open_clip cannot express the student."""
    if not hasattr(model, "vocabulary"):
        raise _refusal("it is a closed-set classifier, and an open_clip model embeds images in a CLIP teacher's space; "
                       "only open-vocabulary students (method=openvocab) export as open_clip models (use format=onnx, "
                       "torch_export or safetensors)")
    if model.fusion is not None:
        raise _refusal(f"its method.fusion={model.fusion_kind} conditions the image embedding on each class text, "
                       f"which a CLIP model's encode_image cannot do; {_FIX_HEAD}")
    if model.head_kind != "linear":
        what = ("a ReLU at every position of the last feature map before pooling" if model.head_kind == "conv" else
                "a ReLU between its two layers (open_clip's timm_proj=mlp has a GELU)")
        raise _refusal(f"its method.head={model.head_kind} applies {what}, and open_clip's timm image tower only "
                       f"pools and then projects with a Linear or a GELU MLP; {_FIX_HEAD}")
    student = config["student"]
    name = student["name"]
    source = resolve_source(name, student.get("source", "auto"))
    kwargs = dict(student.get("kwargs") or {})
    size = int(config["data"]["image_size"])
    options: dict[str, Any] = {}
    if source == "cifar":
        raise _refusal(f"{name!r} is one of pand's CIFAR networks (3x3 stem, no max-pool), which neither timm nor "
                       "torchvision has, so open_clip cannot build it; train a timm or torchvision student (e.g. "
                       "student=resnet18 or student=timm student.name=resnet18) with method.head=linear")
    if source == "torchvision":
        if name not in TORCHVISION_IN_TIMM:
            raise _refusal(f"open_clip builds its image tower with timm, and timm has no model with the state-dict "
                           f"keys and computation of torchvision {name!r}; torchvision students that have one: "
                           f"{', '.join(TORCHVISION_IN_TIMM)}; or train a timm student (student=timm)")
        if kwargs:
            raise _refusal(f"torchvision student.kwargs {kwargs} have no counterpart in open_clip's timm config; train "
                           "without them")
        timm_name, origin = TORCHVISION_IN_TIMM[name], f"torchvision {name} as timm {TORCHVISION_IN_TIMM[name]} " \
                                                       "(same state-dict keys and computation)"
    elif source == "timm":
        if name.startswith("pand_"):
            raise _refusal(f"{name!r} is registered in timm by pand itself, so open_clip alone cannot build it; train "
                           "a model that timm has")
        unknown = sorted(set(kwargs) - set(TIMM_KWARGS))
        if unknown:
            raise _refusal(f"student.kwargs {', '.join(unknown)} cannot be passed through open_clip's timm config, "
                           f"which hands timm.create_model only {', '.join(TIMM_KWARGS)}; train without them")
        options = {TIMM_KWARGS[k]: v for k, v in kwargs.items()}
        natural = natural_size(model.backbone, "timm")
        if natural is not None and natural != (size, size):
            raise _refusal(f"open_clip builds timm {name!r} for its default input size {natural[0]} x {natural[1]} "
                           f"(its vision_cfg passes no img_size to timm), but the student was built for {size} x "
                           f"{size} px; train it with data.image_size={natural[0]}, or train a CNN student")
        pooled, counted = model.head.proj.in_features, getattr(model.backbone, "num_features", None)
        if counted != pooled:
            raise _refusal(f"open_clip sizes its projection by timm's num_features ({counted}) of {name!r}, whose "
                           f"pooled feature has {pooled} (its head adds layers after pooling); train a model whose "
                           "pooled feature is its num_features")
        timm_name, origin = name, f"timm {name}"
    else:
        raise _refusal(f"unknown student source {source!r}")
    vision_cfg = {
        "timm_model_name": timm_name,
        "timm_model_pretrained": False,
        # "" keeps the timm model's own global pooling, the one pand's backbone was built with.
        "timm_pool": options.pop("timm_pool", ""),
        "timm_proj": "linear",
        "timm_proj_bias": True,
        "timm_drop": float(model.head.drop.p),
        "image_size": size,
        **options,
    }
    state = {f"visual.trunk.{k}": v for k, v in model.backbone.state_dict().items()}
    state.update({f"visual.head.proj.{k}": v for k, v in model.head.proj.state_dict().items()})
    return vision_cfg, state, origin


# -- the text tower ------------------------------------------------------------------------------------------------
def teacher_model_cfg(config: Mapping[str, Any]) -> dict[str, Any]:
    """The open_clip ``model_cfg`` the run's teacher was built from (its name, hf-hub: or local-dir: config)."""
    import open_clip

    register_model_configs()
    teacher = config["teacher"]
    name = str(teacher["model"])
    lookup = name if name.startswith(("hf-hub:", "local-dir:")) else name.replace("/", "-")
    try:
        cfg = open_clip.get_model_config(lookup)
    except Exception as err:  # noqa: BLE001 - a missing file, no network, bad JSON: all say the same to the user
        raise PandError(f"could not read the open_clip config of teacher {name!r}: {err}") from err
    if cfg is None:
        raise _refusal(f"open_clip has no config for teacher {name!r}")
    cfg = copy.deepcopy(cfg)
    if "multimodal_cfg" in cfg:
        raise _refusal(f"teacher {name!r} is a CoCa model, whose image tower must return tokens for its text decoder; "
                       "a timm trunk with a projection does not")
    if teacher.get("force_quick_gelu"):
        cfg["quick_gelu"] = True  # as the teacher was loaded
    return cfg


def _plain(tensor: torch.Tensor) -> torch.Tensor:
    # safetensors wants contiguous tensors that share no storage.
    tensor = tensor.detach().cpu()
    return (tensor.float() if tensor.is_floating_point() else tensor).contiguous().clone()


def text_tower_record(tower: DistilledTextTower | None) -> dict[str, Any]:
    """What ``student.json`` says of the exported text tower: the teacher's, or a distilled one with its agreement
    with the teacher's (``text_tower.json``)."""
    if tower is None:
        return {"from": TEACHER_TEXT_TOWER, "note": "the teacher's own text tower: its open_clip text_cfg and weights"}
    record, fit = tower.record, tower.record.get("fit") or {}
    return {"from": "distilled", "folder": str(tower.folder), "text_cfg": tower.text_cfg,
            "params": param_count(tower.tower), "teacher_text_params": record.get("teacher_text_params"),
            "corpus_sha256": tower.meta.get("corpus_sha256"),
            "val": {k: fit.get(k) for k in ("val_loss", "val_cosine", "val_top1")},
            "agreement": record.get("agreement"),
            "note": "a text tower distilled from the teacher's (pand teacher text-tower); agreement: how often the "
                    "student's zero-shot argmax with it equals the argmax with the teacher's text tower"}


def with_text_tower(loaded: LoadedStudent, teacher: ClipTeacher, folder: str | Path) -> DistilledTextTower:
    """The distilled tower in ``folder`` (refused unless made for ``teacher``), and the student's vocabulary made with
    it, so that the exported text matrix is the one the exported ``encode_text`` gives."""
    tower = load_text_tower(folder, teacher)
    loaded.model.set_vocabulary(tower.class_embeddings(loaded.class_names, loaded.config["data"]["templates"]))
    return tower


def open_clip_model(model: nn.Module, teacher: ClipTeacher, config: Mapping[str, Any],
                    tower: DistilledTextTower | None = None
                    ) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """``(model_cfg, state dict, record)`` of the open_clip model: the student's image tower, the teacher's text
    tower (or the distilled ``tower``) and the run's logit scale."""
    vision_cfg, visual, origin = vision_tower(model, config)
    cfg = teacher_model_cfg(config)
    if int(cfg["embed_dim"]) != int(model.embed_dim):
        raise PandError(f"the teacher's open_clip config has embed_dim {cfg['embed_dim']}, the student embeds in "
                        f"{model.embed_dim} dimensions: the teacher is not the one the student was trained with")
    # pand's logits are s * cos, without SigLIP's bias: the exported model computes the same.
    had_bias = cfg.pop("init_logit_bias", None) is not None
    cfg["vision_cfg"] = vision_cfg
    teacher_state = teacher.model.state_dict()
    if tower is None:
        state = {k: _plain(v) for k, v in teacher_state.items()
                 if not k.startswith("visual.") and k not in ("logit_scale", "logit_bias")}
    else:
        cfg["text_cfg"] = tower.text_cfg
        # A CustomTextCLIP keeps its text tower under `text.`, a CLIP at the top level under the same names.
        prefix = "text." if cfg.get("custom_text") else ""
        state = {prefix + k: _plain(v) for k, v in tower.tower.state_dict().items()}
    state.update({k: _plain(v) for k, v in visual.items()})
    scale = float(model.logit_scale)
    state["logit_scale"] = torch.full_like(_plain(teacher_state["logit_scale"]), math.log(scale))
    record = {"image_tower": {"from": origin, **vision_cfg}, "text_tower": text_tower_record(tower),
              "tokenizer": type(teacher.tokenizer).__name__, "logit_scale": scale,
              "logit_scale_note": "model.logit_scale holds log(s), as open_clip keeps it: logits = "
                                  "model.logit_scale.exp() * cosine, s the run's teacher.logit_scale"}
    if had_bias:
        record["logit_bias"] = "the teacher's logit_bias (SigLIP) is left out: pand's logits have none"
    return cfg, state, record


# -- preprocessing -------------------------------------------------------------------------------------------------
def preprocess_cfg(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """open_clip's ``preprocess_cfg`` closest to the run's eval preprocessing, and what ``student.json`` says of it."""
    pp = preprocessing(config)
    size, resize = pp["image_size"], pp["resize_size"]
    cfg = {"size": size, "mode": "RGB", "mean": pp["mean"], "std": pp["std"], "interpolation": "bilinear",
           "resize_mode": "shortest"}
    exact = resize == size
    record: dict[str, Any] = {"preprocess_cfg": cfg, "same_geometry_as_pand": exact}
    if exact:
        record["preprocess_note"] = (
            "open_clip's eval transform does what pand's does (short side to image_size, centre crop, normalise); it "
            "resamples a PIL image where pand resamples a uint8 tensor, so a pixel may differ by a rounding step")
    else:
        record["preprocess_note"] = (
            f"open_clip's image_transform resizes the short side to the crop size: it cannot resize to {resize} px "
            f"and crop {size} px as pand's evaluation does, so its crop keeps the whole short side where pand's keeps "
            f"{size / resize:.1%} of it. For pand's exact inputs apply 'preprocessing' (resize the short side to "
            f"{resize} px, bilinear with antialiasing, centre-crop {size} px, scale to [0, 1], normalise) instead of "
            f"open_clip's preprocess")
        log.warning("format=open_clip: open_clip's preprocessing cannot resize to %d px before the %d px crop as the "
                    "run's evaluation does; it resizes to %d px (student.json says how to reproduce pand's)",
                    resize, size, size)
    return cfg, record


def _preprocess_difference(preprocess, config: Mapping[str, Any]) -> float:
    """Largest difference of open_clip's and pand's preprocessing of one image, in 8-bit levels, for the record."""
    pp = preprocessing(config)
    side = pp["image_size"]
    rng = np.random.default_rng(0)
    h, w = side * 3 // 2 + 3, side * 2 + 1
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    pixels = np.clip(ramp + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    image = PIL.Image.fromarray(pixels, "RGB")
    ours = eval_transform(side, pp["resize_size"], tuple(pp["mean"]), tuple(pp["std"]))(image)
    theirs = preprocess(image)
    std = torch.tensor(pp["std"]).view(3, 1, 1)
    return float(((ours - theirs) * std).abs().max() * 255)


# -- the check -----------------------------------------------------------------------------------------------------
def _check(folder: Path, model: nn.Module, teacher: ClipTeacher, names: Sequence[str], templates: Sequence[str],
           config: Mapping[str, Any], tower: DistilledTextTower | None = None) -> dict[str, Any]:
    """Build the folder with open_clip's own factory and tokenizer and compare it with pand, whose class embeddings
    come from the text tower that went out (the teacher's, or the distilled ``tower``); raises on a difference."""
    import open_clip
    import timm
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    where = f"local-dir:{folder}"
    with torch.random.fork_rng(devices=[]):  # open_clip initialises the towers at random before loading the weights
        try:
            built, _, preprocess = open_clip.create_model_and_transforms(where)
            tokenizer = open_clip.get_tokenizer(where)
        except Exception as err:  # noqa: BLE001 - whatever open_clip fails on, the folder would not load
            first = str(err).strip().splitlines()[0] if str(err).strip() else repr(err)
            raise PandError(f"open_clip {open_clip.__version__} cannot load the folder pand assembled for this student "
                            f"({type(err).__name__}: {first}); nothing was written") from err
    built.eval()
    prompts = [t.format(c) for c in names for t in templates]
    if not torch.equal(tokenizer(prompts), teacher.tokenizer(prompts)):
        raise PandError(f"open_clip's tokenizer of the folder ({type(tokenizer).__name__}) does not give the "
                        f"teacher's tokens ({type(teacher.tokenizer).__name__}) for the class prompts; nothing was "
                        "written")
    side = int(config["data"]["image_size"])
    images = torch.randn(_CHECK_IMAGES, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = build_zero_shot_classifier(built, tokenizer, list(names), list(templates), device="cpu",
                                          use_tqdm=False).float()  # [D, C]
        theirs = F.normalize(built.encode_image(images).float(), dim=-1) @ text
        classes = (teacher if tower is None else tower).class_embeddings(names, templates)
        ours = model.embed(images) @ classes.t()
        logit_diff = float((built.logit_scale.exp() * theirs - model(images)).abs().max())
        vocab_diff = float((classes - model.vocabulary).abs().max())
    diff = float((theirs - ours).abs().max())
    if not math.isfinite(diff) or diff > SIMILARITY_ATOL:
        raise PandError(f"open_clip's similarities of the exported model differ from pand's by up to {diff:.3g} "
                        f"(tolerance {SIMILARITY_ATOL:g}); nothing was written")
    if vocab_diff > SIMILARITY_ATOL:
        log.warning("the exported text tower's class text embeddings differ from the student's stored vocabulary by "
                    "up to %.3g: the exported text tower is the one loaded now", vocab_diff)
    return {"images": _CHECK_IMAGES, "image_size": side, "classes": len(names), "templates": len(templates),
            "max_abs_similarity_diff": diff, "tolerance": SIMILARITY_ATOL, "max_abs_logit_diff": logit_diff,
            "vocabulary_vs_teacher_max_abs_diff": vocab_diff, "tokens_equal": True,
            # where the geometry is the same, what is left is resampling PIL images vs uint8 tensors
            "preprocess_max_diff_8bit_levels": _preprocess_difference(preprocess, config)
            if config["data"]["resize_size"] == config["data"]["image_size"] else None,
            "runtime": f"open_clip {open_clip.__version__}, timm {timm.__version__}"}


# -- writing -------------------------------------------------------------------------------------------------------
def _existing_ancestor(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def write_open_clip(model: nn.Module, teacher: ClipTeacher, config: Mapping[str, Any], names: Sequence[str],
                    out: Path, tower: DistilledTextTower | None = None) -> tuple[list[Path], dict[str, Any]]:
    """Assemble, check and write the open_clip folder into ``out``, with the teacher's text tower or the distilled
    ``tower``; returns the files written and the record for ``student.json``. Nothing reaches ``out`` unless
    open_clip loads the folder and agrees with pand."""
    model_cfg, state, record = open_clip_model(model, teacher, config, tower)
    pp_cfg, pp_record = preprocess_cfg(config)
    templates = list(config["data"]["templates"])
    # Staged beside the output (same file system), so the check reads exactly the files that are then written.
    with tempfile.TemporaryDirectory(prefix=".pand-open_clip-", dir=_existing_ancestor(out)) as tmp:
        staging = Path(tmp)
        (staging / CONFIG_NAME).write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": pp_cfg}, indent=2)
                                           + "\n")
        save_file(state, str(staging / WEIGHTS_NAME), metadata={"format": "pt"})
        if hasattr(teacher.tokenizer, "save_pretrained"):
            # open_clip's local-dir: reads a Hugging Face tokenizer from the folder itself.
            teacher.tokenizer.save_pretrained(str(staging))
        check = _check(staging, model, teacher, names, templates, config, tower)
        written = []
        # The config last: a reader that finds the new config finds the new weights and tokenizer beside it.
        for path in sorted(staging.iterdir(), key=lambda p: (p.name == CONFIG_NAME, p.name)):
            if path.is_file():
                with path.open("rb") as src:
                    written.append(atomic_write_with(out / path.name, lambda f, s=src: shutil.copyfileobj(s, f)))
    load = (f"model, _, preprocess = open_clip.create_model_and_transforms('local-dir:{out}'); model.eval(); "
            f"tokenizer = open_clip.get_tokenizer('local-dir:{out}')")
    info = {"open_clip": {**record, **pp_record, "load": load, "check": check}, "teacher": dict(teacher.identity)}
    log.info("format=open_clip: %s checked against pand (max similarity difference %.3g)", out, check[
        "max_abs_similarity_diff"])
    return written, info

