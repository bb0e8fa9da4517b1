"""A frozen open_clip model used as a teacher.

The teacher is never trained: it stays in eval mode (so drop-path and dropout are off) even when the Lightning module
around it is put in train mode, and every call runs without gradients.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError, PandError, WeightsUnavailableError
from pand.networks.hub import (
    hf_cache_dir,
    hf_cached,
    hub_file_names,
    hub_offline,
    is_network_error,
    offline_refusal,
    unreachable_refusal,
)
from pand.teachers.frozen import FrozenTeacher
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, STAGE_FEATURES
from pand.teachers.registry import TeacherKind, register_teacher_kind

log = logging.getLogger(__name__)

#: Logit scale the VL2Lite and PAND authors fix for the teacher's zero-shot logits (1 / 0.07).
DEFAULT_LOGIT_SCALE = 1.0 / 0.07

#: Value of ``teacher.pretrained`` that asks for random weights (tests, benchmarks); never the silent default.
#: ``random`` is seeded with 0 and ``random:N`` with N, so the same "random" teacher comes back in every process.
RANDOM_WEIGHTS = "random"

_MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_model_configs() -> None:
    """Make pand's own open_clip model configs (tiny test teachers) known to open_clip by name."""
    global _registered
    if not _registered:
        import open_clip

        open_clip.add_model_config(_MODEL_CONFIG_DIR)
        _registered = True


def weights_digest(module: nn.Module) -> str:
    """A cheap fingerprint of a model's weights that does not depend on where they came from.

    Hashing a 5 GB checkpoint file would cost seconds on every run, and the same weights arrive as a tag, a file or a
    hub repo; so every tensor contributes its name, shape, dtype and up to 1024 evenly strided values.
    """
    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // 1024)
        sample = flat[::step][:1024].to(torch.float32).cpu().contiguous()
        h.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


#: Prompts encoded per text-tower forward by :func:`prompt_ensemble`.
_TEXTS_PER_FORWARD = 1024


class _Float32Text:
    """What ``build_zero_shot_classifier`` calls (``encode_text(tokens, normalize=...)``), in float32 like pand's
    :meth:`ClipTeacher.encode_texts`: the text tower's output is cast before it is normalised."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.model.encode_text(tokens).float()
        return F.normalize(out, dim=-1) if normalize else out


@torch.no_grad()
def prompt_ensemble(model: nn.Module, tokenizer: Any, classnames: Sequence[str], templates: Sequence[str],
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """C x D class embeddings of a text tower (anything with ``encode_text(tokens)``: an open_clip model, or a text
    tower distilled from one): the mean over templates of normalised text embeddings, re-normalised (float32).

    The computation is open_clip's ``build_zero_shot_classifier`` (every template formatted per class, encoded,
    normalised, averaged over the templates and re-normalised; with one template the average is that template's
    embedding), which returns D x C, hence the transpose. pand keeps only what the library does not do:

    * clear errors: no templates, a template without ``{}`` or no class names raise :class:`ConfigError` (the
      library asserts, or formats a template without ``{}`` into the same prompt for every class);
    * float32: the library normalises and averages in the text tower's dtype (and under any enclosing autocast);
      pand's contract, like :meth:`ClipTeacher.encode_texts`, is float32 embeddings, so the text tower's output is
      cast to float32 before it is normalised (a no-op for a float32 teacher);
    * batches of about ``_TEXTS_PER_FORWARD`` prompts (the library's default is 10 classes, however many
      templates), so that 80 templates do not mean 80 x the memory of one.
    """
    if not templates:
        raise ConfigError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    for t in templates:
        if "{}" not in t:
            raise ConfigError(f"prompt template {t!r} has no '{{}}' where the class name goes")
    if not classnames:
        raise ConfigError("class_embeddings needs at least one class name")
    from open_clip.zero_shot_classifier import build_zero_shot_classifier

    weights = build_zero_shot_classifier(
        _Float32Text(model),
        tokenizer,
        list(classnames),
        list(templates),
        num_classes_per_batch=max(1, _TEXTS_PER_FORWARD // len(templates)),
        device=device,
        use_tqdm=False,
    )  # [D, C]
    return weights.t().contiguous()


class ClipTeacher(FrozenTeacher):
    """A frozen CLIP-like model: normalised image and text embeddings and zero-shot logits.

    Args:
        model: an open_clip ``CLIP`` or ``CustomTextCLIP``.
        tokenizer: the open_clip tokenizer that goes with it.
        image_size, mean, std: the preprocessing the image tower expects.
        identity: what made the weights (model name, pretrained source, weights digest); stored next to every
            artefact derived from this teacher so that a mismatch can be refused later.
        logit_scale: scale of the zero-shot logits; ``None`` uses the model's learned ``logit_scale.exp()``.

    Its per-sample output is ``image_embeds``; class logits come from those and a text matrix (template or learned
    CoOp embeddings), see :class:`~pand.teachers.source.ZeroShotLogits`.
    """

    provides = frozenset({IMAGE_EMBEDS, STAGE_FEATURES})

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        identity: dict[str, str],
        logit_scale: float | None = DEFAULT_LOGIT_SCALE,
    ) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.image_size = int(image_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.identity = dict(identity)
        if logit_scale is None:
            logit_scale = float(model.logit_scale.exp().item())
        self.logit_scale = float(logit_scale)
        self.freeze()

    @property
    def embed_dim(self) -> int:
        proj = getattr(self.model, "text_projection", None)
        if isinstance(proj, torch.Tensor):
            return int(proj.shape[-1])
        with torch.no_grad():
            return int(self.encode_texts(["a"]).shape[-1])

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings (float32) of images already in the teacher's size and normalisation."""
        return F.normalize(self.model.encode_image(images).float(), dim=-1)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (float32)."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def caption_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """N x D L2-normalised (float32, on the CPU) embeddings of whole sentences, encoded as they are (no template),
        about ``_TEXTS_PER_FORWARD`` per text-tower forward: a caption set of 600k sentences must not be one batch."""
        texts = list(texts)
        if not texts:
            raise ConfigError("caption_embeddings needs at least one caption")
        return torch.cat([self.encode_texts(texts[i:i + _TEXTS_PER_FORWARD]).cpu()
                          for i in range(0, len(texts), _TEXTS_PER_FORWARD)])

    @torch.no_grad()
    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """C x D class embeddings: the mean over templates of normalised text embeddings, re-normalised (float32);
        :func:`prompt_ensemble` of this teacher's text tower."""
        return prompt_ensemble(self.model, self.tokenizer, classnames, templates, self.device)

    @torch.no_grad()
    def class_token_features(self, classnames: Sequence[str],
                             templates: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token text features of every class prompt: ``[C, L, D]`` and a ``[C, L]`` mask of real tokens.

        The final-layer token states (after ``ln_final``, taken with a forward hook during ``encode_text``) projected
        by ``text_projection`` into the joint space; the tokens of all templates of a class are concatenated, and
        positions that are padding in every prompt are dropped. Cross-attention fusion attends over them.
        """
        owner = self.model if isinstance(getattr(self.model, "ln_final", None), nn.Module) else getattr(
            self.model, "text", None)
        ln_final = getattr(owner, "ln_final", None)
        proj = getattr(owner, "text_projection", None)
        if not isinstance(ln_final, nn.Module):
            raise ConfigError("per-token text features need an open_clip text tower with ln_final (CLIP or "
                              "CustomTextCLIP with a TextTransformer); this teacher has none")
        feats, masks = [], []
        for template in templates:
            tokens = self.tokenizer([template.format(c) for c in classnames]).to(self.device)
            kept: list[torch.Tensor] = []
            handle = ln_final.register_forward_hook(lambda m, a, out: kept.append(out))
            try:
                self.model.encode_text(tokens)
            finally:
                handle.remove()
            states = kept[0] if kept else None
            if states is None or states.dim() != 3 or states.shape[1] != tokens.shape[1]:
                raise ConfigError("this teacher's text tower normalises only its pooled token (a class-token text "
                                  "tower), so it has no per-token features for cross-attention; use method.fusion=film")
            if proj is not None:
                states = proj(states) if isinstance(proj, nn.Module) else states @ proj
            feats.append(states.float())
            masks.append(tokens != 0)
        feats_t, mask = torch.cat(feats, dim=1), torch.cat(masks, dim=1)
        used = mask.any(dim=0)
        return feats_t[:, used].cpu(), mask[:, used].cpu()

    def zero_shot_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor) -> torch.Tensor:
        return self.logit_scale * image_embeds.float() @ text_embeds.float().t()

    @property
    def stage_root(self) -> nn.Module:
        return self.model.visual

    def outputs(self, images: torch.Tensor, keys) -> dict[str, torch.Tensor]:
        keys = set(keys)
        if not keys & self.provides:
            return {}
        # Not encode_images: a method training prompts inside the teacher needs gradients through this pass.
        with self.capturing_stages(STAGE_FEATURES in keys) as stages:
            embeds = F.normalize(self.model.encode_image(images).float(), dim=-1)
            out = {STAGE_FEATURES: stages()} if STAGE_FEATURES in keys else {}
        if IMAGE_EMBEDS in keys:
            out[IMAGE_EMBEDS] = embeds
        return out


def _describe_pretrained(model_name: str, pretrained: str | None) -> str:
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return model_name
    if pretrained and os.path.isfile(pretrained):
        return f"file:{Path(pretrained).resolve()}"
    return str(pretrained)


def _local_weights_hint(model: str) -> str:
    folder = ("teacher.model=local-dir:/path/to/folder with open_clip_config.json and the weights inside (a local "
              "copy of the repo's files).")
    if model.startswith(("hf-hub:", "local-dir:")):  # teacher.pretrained is ignored for these
        return "download the files on a machine with network access and point pand at them: " + folder
    return (
        "download the weights on a machine with network access and point pand at them: "
        f"teacher.model={model} teacher.pretrained=/path/to/open_clip_pytorch_model.bin (or .safetensors, a local "
        f"file), or {folder}"
    )


def _weights_source(model: str, pretrained: str | None, cache_dir: str | None) -> tuple[str, Path, list[str]]:
    """What pand asks open_clip to download: (hub repo or url, the cache folder it lands in, candidate file names).

    The file names are the ones open_clip's ``download_pretrained`` tries (a ``.safetensors`` twin first, then the
    configured name); any of them being cached means open_clip can load without network.
    """
    from open_clip import constants as oc

    if model.startswith("hf-hub:"):
        return model[len("hf-hub:"):], hf_cache_dir(cache_dir), [oc.HF_CONFIG_NAME]
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, pretrained) if pretrained else {}
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # 'org/repo/' means open_clip's default file name
        names = hub_file_names(filename or oc.HF_WEIGHTS_NAME, (oc.HF_WEIGHTS_NAME, oc.HF_SAFE_WEIGHTS_NAME),
                               (".bin", ".pth"))
        return repo, hf_cache_dir(cache_dir), names
    if cfg.get("url"):
        folder = Path(cache_dir).expanduser() if cache_dir else Path("~/.cache/clip").expanduser()
        return cfg["url"], folder, [os.path.basename(cfg["url"])]
    return "", hf_cache_dir(cache_dir), []


def _refuse_uncached_offline(model: str, pretrained: str | None, cache_dir: str | None) -> None:
    """With ``HF_HUB_OFFLINE=1``, refuse at once weights that are not in the local cache (:mod:`pand.networks.hub`)."""
    source, folder, names = _weights_source(model, pretrained, cache_dir)
    if not names or model.startswith("local-dir:"):
        return  # nothing open_clip would download
    if source.startswith(("http://", "https://")):
        cached = (folder / names[0]).is_file()
    else:
        cached = hf_cached(source, names, cache_dir) is not None
    if cached:
        return
    what = model if model.startswith("hf-hub:") else f"{model!r} (pretrained={pretrained!r}, from {source})"
    raise WeightsUnavailableError(offline_refusal(
        f"the weights of teacher {what} are not in the local cache {folder} (looked for {', '.join(names)})",
        _local_weights_hint(model),
    ))


def _download_failed(model: str, pretrained: str | None, cache_dir: str | None, err: Exception) -> PandError:
    """pand's message for weights open_clip could not obtain; a network failure suggests HF_HUB_OFFLINE=1."""
    try:
        source, folder, _ = _weights_source(model, pretrained, cache_dir)
    except Exception:  # noqa: BLE001 - the message must not fail; the tag was checked before
        source, folder = "", hf_cache_dir(cache_dir)
    what = model if model.startswith("hf-hub:") else f"{model!r} (pretrained={pretrained!r})"
    origin = f" from {source}" if source else ""
    if hub_offline():
        return WeightsUnavailableError(offline_refusal(
            f"could not load the weights of teacher {what} from the local cache {folder}", _local_weights_hint(model),
            err,
        ))
    if is_network_error(err):
        return WeightsUnavailableError(unreachable_refusal(
            f"could not download the weights of teacher {what}{origin} into {folder}", _local_weights_hint(model), err
        ))
    return WeightsUnavailableError(
        f"could not obtain the weights of teacher {what}{origin}: {err}\nWithout network access, "
        + _local_weights_hint(model)
    )


def load_clip_teacher(
    model: str,
    pretrained: str | None,
    *,
    logit_scale: float | str | None = DEFAULT_LOGIT_SCALE,
    cache_dir: str | None = None,
    device: str | torch.device = "cpu",
    force_quick_gelu: bool = False,
    image_size: int | None = None,
) -> ClipTeacher:
    """Build a frozen open_clip teacher.

    ``model`` is an open_clip model name (``convnext_xxlarge``, ``ViT-B-16``, pand's ``pand-tiny-vit``), or
    ``hf-hub:org/repo`` / ``local-dir:/path`` (then ``pretrained`` is ignored). ``pretrained`` is a pretrained tag,
    a local ``.pt/.bin/.safetensors`` file, or ``"random"`` for random weights. ``image_size`` overrides the
    image tower's input size (position embeddings are resized where open_clip supports it).

    With ``HF_HUB_OFFLINE=1`` weights that are not in the local cache are refused at once, naming the model, the tag
    and the cache folder; a download that fails for a network reason suggests ``HF_HUB_OFFLINE=1`` and a local file
    (see :mod:`pand.networks.hub`).
    """
    import open_clip

    register_model_configs()
    has_schema = model.startswith(("hf-hub:", "local-dir:"))
    if not has_schema and not pretrained:
        raise ConfigError(
            f"teacher.pretrained is not set for teacher {model!r}. Give a pretrained tag "
            f"(one of {open_clip.list_pretrained_tags_by_model(model) or 'none known'}), a local weights file "
            f"(teacher.pretrained=/path/to/weights.safetensors), or teacher.pretrained={RANDOM_WEIGHTS} for a "
            "randomly initialised teacher (tests only)."
        )
    if not has_schema and model.replace("/", "-") not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model {model!r}; see open_clip.list_models() or use hf-hub:org/repo or local-dir:/path"
        )
    random_init = not has_schema and (pretrained == RANDOM_WEIGHTS or pretrained.startswith(RANDOM_WEIGHTS + ":"))
    random_seed = 0
    if random_init and ":" in pretrained:
        try:
            random_seed = int(pretrained.split(":", 1)[1])
        except ValueError:
            raise ConfigError(f"teacher.pretrained={pretrained!r}: use 'random' or 'random:<integer seed>'") from None
    weights_file = None
    if not has_schema and not random_init:
        looks_like_path = os.sep in pretrained or pretrained.endswith((".pt", ".pth", ".bin", ".safetensors"))
        if looks_like_path:
            if not os.path.isfile(pretrained):
                raise WeightsUnavailableError(
                    f"teacher weights file {pretrained} does not exist. Point teacher.pretrained at a .pt, .bin or "
                    f".safetensors file holding the {model} state dict."
                )
            weights_file = pretrained
        elif open_clip.get_pretrained_cfg(model, pretrained) == {}:
            raise ConfigError(
                f"{pretrained!r} is neither a file nor a pretrained tag of {model!r}; known tags: "
                f"{open_clip.list_pretrained_tags_by_model(model)}"
            )
    if weights_file is None and not random_init and hub_offline():
        _refuse_uncached_offline(model, pretrained, cache_dir)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(random_seed)
            clip_model, _, preprocess = open_clip.create_model_and_transforms(
                model,
                pretrained=None if random_init else pretrained,
                cache_dir=cache_dir,
                device=device,
                force_quick_gelu=force_quick_gelu,
                force_image_size=image_size,
                pretrained_image=False,
                pretrained_text=False,
                require_pretrained=not random_init,
            )
    except (RuntimeError, OSError, ValueError) as err:
        if weights_file is not None:
            raise WeightsUnavailableError(
                f"could not load teacher weights from {weights_file} into {model}: {err}"
            ) from err
        raise _download_failed(model, pretrained, cache_dir, err) from err
    pp = clip_model.visual.preprocess_cfg if hasattr(clip_model.visual, "preprocess_cfg") else {}
    size = pp.get("size", getattr(clip_model.visual, "image_size", 224))
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean = pp.get("mean", open_clip.OPENAI_DATASET_MEAN)
    std = pp.get("std", open_clip.OPENAI_DATASET_STD)
    tokenizer = open_clip.get_tokenizer(model)
    identity = {
        "model": model,
        "pretrained": _describe_pretrained(model, pretrained),
        "weights": weights_digest(clip_model),
    }
    if logit_scale == "learned":
        logit_scale = None
    elif isinstance(logit_scale, str):
        raise ConfigError(f"teacher.logit_scale must be a number or 'learned', got {logit_scale!r}")
    del preprocess
    return ClipTeacher(
        clip_model, tokenizer, image_size=size, mean=mean, std=std, identity=identity, logit_scale=logit_scale
    )


@register_teacher_kind("clip")
class ClipKind(TeacherKind):
    """An open_clip model: image embeddings, zero-shot logits against the class text, stage features. Its cache
    stores the image embeddings; logits are computed from them and the class text matrix."""

    provides = frozenset({IMAGE_EMBEDS, LOGITS, STAGE_FEATURES})
    cached = frozenset({IMAGE_EMBEDS})
    served_from_cache = frozenset({IMAGE_EMBEDS, LOGITS})
    has_text = True
    # The settings every CLIP teacher config shares; the model and its weights are the presets' (teacher=vit_b16).
    defaults_option = "_base"

    def load(self, teacher: Mapping[str, Any], *, data: Mapping[str, Any], classes: Sequence[str] | None,
             device: str | torch.device) -> ClipTeacher:
        model = load_clip_teacher(
            teacher["model"], teacher.get("pretrained"), logit_scale=teacher.get("logit_scale"),
            cache_dir=teacher.get("cache_dir"), device=device, force_quick_gelu=bool(teacher.get("force_quick_gelu")),
        )
        model.use_stages(teacher.get("stages"))
        return model

    def spec(self, teacher: Mapping[str, Any]) -> dict[str, Any]:
        return {"kind": self.name, "model": teacher["model"], "pretrained": teacher.get("pretrained"),
                "force_quick_gelu": bool(teacher.get("force_quick_gelu"))}

    def context(self, teacher: FrozenTeacher) -> dict[str, Any]:
        return {**super().context(teacher), "embed_dim": teacher.embed_dim, "logit_scale": teacher.logit_scale}

    def context_from_cache(self, meta: Mapping[str, Any], teacher: Mapping[str, Any]) -> dict[str, Any]:
        scale = teacher.get("logit_scale")
        return {**super().context_from_cache(meta, teacher), "embed_dim": int(meta["embed_dim"]),
                "logit_scale": float(meta["learned_logit_scale"]) if scale in (None, "learned") else float(scale)}

    def cache_contents(self, teacher: FrozenTeacher, classes: Sequence[str],
                       templates: Sequence[str] | None) -> tuple[torch.Tensor | None, dict[str, Any]]:
        return teacher.class_embeddings(classes, list(templates or ())), {
            "embed_dim": teacher.embed_dim, "learned_logit_scale": float(teacher.model.logit_scale.exp())}
