"""A small text tower distilled from a CLIP teacher's (``pand teacher text-tower``), and the folder that holds it.

The tower is open_clip's own ``TextTransformer``, built by open_clip (``open_clip.model._build_text_tower``) from
the teacher's ``text_cfg`` with only ``width``, ``heads`` and ``layers`` replaced: the context length, the vocabulary,
the tokenizer fields, the pooled token and the causal mask stay the teacher's, so the teacher's tokenizer feeds it
and its output lives in the teacher's joint space (``embed_dim``). It replaces the teacher's text tower wherever one
turns class names into an open-vocabulary student's classifier, and an open_clip export carries it as it is: its
``model_cfg.text_cfg`` is the tower's config and its weights are the tower's state dict, whose keys are those of a
CLIP's text tower (``token_embedding.weight``, ``positional_embedding``, ``transformer.resblocks.*``,
``ln_final.*``, ``text_projection``; the causal ``attn_mask`` is a non-persistent buffer in both).

Only a tower whose tokens open_clip can reproduce from a folder applies: the teacher's tokenizer must be open_clip's
``SimpleTokenizer`` (CLIP's BPE) or a Hugging Face tokenizer (``HFTokenizer``), and its text tower a transformer that
open_clip builds from ``text_cfg`` (not a Hugging Face text model, ``hf_model_name``). Others are refused with the
reason.

The folder (written by :mod:`pand.text_tower_fit`):

* ``text_tower.safetensors``: the tower's state dict; one metadata entry, ``pand_text_tower``, a JSON object with
  ``teacher`` (the teacher's identity: model, pretrained, weights digest), ``embed_dim``, ``text_cfg``, ``quick_gelu``
  and ``corpus_sha256`` (one entry, because safetensors writes its metadata map in hash order, which varies between
  processes);
* ``text_tower.json``: the same, the fitting options and history, the training texts' counts and the agreement report.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from pand.errors import ConfigError, MismatchError
from pand.rules import TEXT_TOWER_RECORD, TEXT_TOWER_WEIGHTS
from pand.teachers.clip import ClipTeacher, prompt_ensemble

#: The safetensors metadata key of the tower's description.
METADATA_KEY = "pand_text_tower"
#: The size of a distilled tower, per option: (a share of the teacher's, the least, the most). Half the teacher's
#: width and layers, at most 256 wide and 4 deep: ViT-B/16's tower (512 wide, 12 layers) gives 256 x 4 with 4 heads.
MAX_WIDTH, MAX_LAYERS, HEAD_WIDTH = 256, 4, 64
#: Texts per forward when a tower embeds a list of texts.
TEXTS_PER_FORWARD = 1024
#: Words of a tokenizer's vocabulary that make the generic corpus: lower-case ASCII letters, three or more.
_WORD = re.compile(r"[a-z]{3,}")


def default_size(teacher_text_cfg: Mapping[str, Any]) -> dict[str, int]:
    """``width``, ``heads`` and ``layers`` of a tower distilled from a teacher with this ``text_cfg``: half its width
    (at most :data:`MAX_WIDTH`), half its layers (at least 1, at most :data:`MAX_LAYERS`), a head per
    :data:`HEAD_WIDTH` channels."""
    width = max(1, min(MAX_WIDTH, int(teacher_text_cfg.get("width", 512)) // 2))
    layers = max(1, min(MAX_LAYERS, int(teacher_text_cfg.get("layers", 12)) // 2))
    return {"width": width, "heads": max(1, width // HEAD_WIDTH), "layers": layers}


def tower_text_cfg(teacher_text_cfg: Mapping[str, Any], *, width: int | None = None, heads: int | None = None,
                   layers: int | None = None) -> dict[str, Any]:
    """The distilled tower's ``text_cfg``: the teacher's, with ``width``, ``heads`` and ``layers`` replaced (each
    :func:`default_size` unless given)."""
    if teacher_text_cfg.get("hf_model_name"):
        raise ConfigError(f"the teacher's text tower is the Hugging Face model {teacher_text_cfg['hf_model_name']!r}, "
                          "which pools and projects its tokens its own way; a distilled tower is open_clip's "
                          "TextTransformer, for teachers whose text tower is one (text_cfg without hf_model_name)")
    size = default_size(teacher_text_cfg)
    if width is not None:
        size["width"] = int(width)
        size["heads"] = max(1, int(width) // HEAD_WIDTH)
    size.update({k: int(v) for k, v in (("heads", heads), ("layers", layers)) if v is not None})
    if size["width"] % size["heads"]:
        raise ConfigError(f"width={size['width']} is not a multiple of heads={size['heads']}: each attention head "
                          "takes an equal share of the width")
    cfg = copy.deepcopy(dict(teacher_text_cfg))
    cfg.update(size)
    return cfg


def check_tokenizer(tokenizer: Any) -> None:
    """Refuse a tokenizer that an open_clip folder cannot name (open_clip's ``get_tokenizer`` on an exported folder
    gives its SimpleTokenizer, or a Hugging Face tokenizer read from the folder)."""
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer

    if not isinstance(tokenizer, (SimpleTokenizer, HFTokenizer)):
        raise ConfigError(f"the teacher's tokenizer is open_clip's {type(tokenizer).__name__}, which open_clip picks "
                          "by the model's name, not from a text_cfg; a distilled text tower works with open_clip's "
                          "SimpleTokenizer (CLIP's BPE) or a Hugging Face tokenizer only")


def build_tower(text_cfg: Mapping[str, Any], embed_dim: int, quick_gelu: bool = False) -> nn.Module:
    """open_clip's text tower for ``text_cfg`` (random weights: seed torch first for a reproducible start)."""
    from open_clip.model import _build_text_tower

    return _build_text_tower(int(embed_dim), dict(text_cfg), quick_gelu=bool(quick_gelu))


def text_owner(model: nn.Module) -> nn.Module:
    """The module of an open_clip model that holds its text tower's ``token_embedding``: the model itself (CLIP) or
    its ``text`` (CustomTextCLIP)."""
    return model if isinstance(getattr(model, "token_embedding", None), nn.Module) else model.text


@torch.no_grad()
def warm_start(tower: nn.Module, teacher_model: nn.Module) -> dict[str, Any]:
    """Start the tower's token and position embeddings from the teacher's, projected to the tower's width by the
    teacher token embeddings' principal directions (a fixed projection: the SVD of the centred ``V x W`` matrix, each
    direction's sign fixed by its largest component). A tower as wide as the teacher or wider keeps the teacher's
    coordinates and zeros in the rest. Returns what was done, for the record."""
    owner = text_owner(teacher_model)
    tokens = owner.token_embedding.weight.detach().float().cpu()
    positions = owner.positional_embedding.detach().float().cpu()
    wide, narrow = tokens.shape[1], tower.token_embedding.weight.shape[1]
    if (tokens.shape[0], positions.shape[0]) != (tower.token_embedding.weight.shape[0],
                                                  tower.positional_embedding.shape[0]):
        raise MismatchError("the teacher's token or position embeddings do not have the tower's vocabulary or context "
                            "length")
    if narrow >= wide:
        projection = torch.eye(wide, narrow)
    else:
        _, _, vh = torch.linalg.svd(tokens - tokens.mean(0), full_matrices=False)
        directions = vh[:narrow]  # [narrow, wide]
        signs = directions.gather(1, directions.abs().argmax(1, keepdim=True)).sign()
        projection = (directions * signs).t()
    device = tower.token_embedding.weight.device
    tower.token_embedding.weight.copy_((tokens @ projection).to(device))
    tower.positional_embedding.copy_((positions @ projection).to(device))
    kept = 1.0 if narrow >= wide else float((((tokens - tokens.mean(0)) @ projection).pow(2).sum()
                                             / (tokens - tokens.mean(0)).pow(2).sum()))
    return {"from": f"teacher token and position embeddings ({wide} wide)", "projection": "identity" if narrow >= wide
            else f"top {narrow} principal directions of the token embeddings", "variance_kept": kept}


def vocabulary_words(tokenizer: Any) -> list[str]:
    """The words of a tokenizer's vocabulary, in its order: for open_clip's SimpleTokenizer the whole-word entries
    (ending in ``</w>``), for a Hugging Face tokenizer the entries with their word-start mark (``Ġ``, ``▁``) removed
    and without WordPiece continuations (``##``); lower-cased, kept where they are ASCII letters, three or more."""
    if hasattr(tokenizer, "encoder"):
        entries = [k[:-len("</w>")] for k in tokenizer.encoder if k.endswith("</w>")]
    else:
        entries = [k.lstrip("Ġ▁") for k in tokenizer.tokenizer.get_vocab() if not k.startswith("##")]
    words: dict[str, None] = {}
    for entry in entries:
        word = entry.lower()
        if _WORD.fullmatch(word):
            words.setdefault(word, None)
    return list(words)


def param_count(module: nn.Module) -> int:
    return int(sum(p.numel() for p in module.parameters()))


class DistilledTextTower(nn.Module):
    """A distilled tower with the teacher's tokenizer: what an open-vocabulary student's classifier and an open_clip
    export read in place of the teacher's text tower.

    ``meta``: the tower's description (:data:`METADATA_KEY`: teacher, embed_dim, text_cfg, quick_gelu,
    corpus_sha256); ``record``: the folder's ``text_tower.json`` where there is one.
    """

    def __init__(self, tower: nn.Module, tokenizer: Any, meta: Mapping[str, Any],
                 record: Mapping[str, Any] | None = None, folder: Path | None = None) -> None:
        super().__init__()
        self.tower = tower
        self.tokenizer = tokenizer
        self.meta = dict(meta)
        self.record = dict(record or {})
        self.folder = folder

    @property
    def text_cfg(self) -> dict[str, Any]:
        return copy.deepcopy(self.meta["text_cfg"])

    @property
    def device(self) -> torch.device:
        return self.tower.token_embedding.weight.device

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        out = self.tower(tokens)
        return F.normalize(out, dim=-1) if normalize else out

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised float32 embeddings of ``texts`` (on the CPU), :data:`TEXTS_PER_FORWARD` per forward."""
        texts = list(texts)
        return torch.cat([F.normalize(self.tower(self.tokenizer(texts[i:i + TEXTS_PER_FORWARD]).to(self.device))
                                      .float(), dim=-1).cpu() for i in range(0, len(texts), TEXTS_PER_FORWARD)])

    def class_embeddings(self, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """C x D class embeddings, as :meth:`ClipTeacher.class_embeddings` makes them with the teacher's tower."""
        return prompt_ensemble(self, self.tokenizer, classnames, templates, self.device)


def tower_meta(teacher: ClipTeacher, text_cfg: Mapping[str, Any], embed_dim: int, quick_gelu: bool,
               corpus_sha256: str) -> dict[str, Any]:
    return {"teacher": dict(teacher.identity), "embed_dim": int(embed_dim), "text_cfg": dict(text_cfg),
            "quick_gelu": bool(quick_gelu), "corpus_sha256": corpus_sha256}


def weights_bytes(tower: nn.Module, meta: Mapping[str, Any]) -> bytes:
    """``text_tower.safetensors``: the tower's state dict (float32, contiguous) and its description."""
    state = {k: v.detach().cpu().float().contiguous().clone() for k, v in tower.state_dict().items()}
    return save(state, metadata={METADATA_KEY: json.dumps(dict(meta), sort_keys=True)})


def made_for(meta: Mapping[str, Any], teacher: ClipTeacher, what: str = "this run's") -> None:
    """Refuse a tower distilled from another teacher than ``teacher`` (by weights digest) or for another embedding
    width, naming both."""
    theirs, ours = dict(meta.get("teacher") or {}), teacher.identity
    if theirs.get("weights") != ours.get("weights"):
        raise MismatchError(
            f"the text tower was distilled from teacher {theirs.get('model')!r} (pretrained "
            f"{theirs.get('pretrained')!r}, weights digest {str(theirs.get('weights'))[:12]}...), {what} teacher is {ours.get('model')!r} "
            f"(pretrained {ours.get('pretrained')!r}, weights digest {str(ours.get('weights'))[:12]}...): a text "
            "tower only stands in for the teacher it was distilled from; distil one for this teacher with pand "
            "teacher text-tower")
    if int(meta.get("embed_dim", -1)) != int(teacher.embed_dim):
        raise MismatchError(f"the text tower embeds in {meta.get('embed_dim')} dimensions, {what} teacher in "
                            f"{teacher.embed_dim}")


def load_text_tower(folder: str | Path, teacher: ClipTeacher, device: str | torch.device = "cpu",
                    what: str = "this run's") -> DistilledTextTower:
    """The tower in ``folder`` (``text_tower.safetensors`` and ``text_tower.json``), refused unless it was distilled
    from ``teacher``; it tokenizes with the teacher's tokenizer."""
    folder = Path(folder)
    weights, record_path = folder / TEXT_TOWER_WEIGHTS, folder / TEXT_TOWER_RECORD
    for path in (weights, record_path):
        if not path.is_file():
            raise ConfigError(f"{folder} is not a text tower folder: it has no {path.name} (pand teacher text-tower "
                              "writes text_tower.safetensors and text_tower.json)")
    with safe_open(str(weights), framework="pt") as f:
        described = (f.metadata() or {}).get(METADATA_KEY)
    if described is None:
        raise ConfigError(f"{weights} has no {METADATA_KEY!r} metadata: it was not written by pand teacher text-tower")
    meta = json.loads(described)
    made_for(meta, teacher, what)
    check_tokenizer(teacher.tokenizer)
    with torch.random.fork_rng(devices=[]):  # the random start is overwritten: it must not move the caller's RNG
        tower = build_tower(meta["text_cfg"], meta["embed_dim"], meta.get("quick_gelu", False))
    tower.load_state_dict(load_file(str(weights)), strict=True)
    record = json.loads(record_path.read_text(encoding="utf-8"))
    return DistilledTextTower(tower.to(device).eval(), teacher.tokenizer, meta, record, folder).eval()
