"""An open-vocabulary student: any backbone mapped into the teacher's joint image-text space (KDEOV).

The student embeds an image as ``e = norm(pool(head(F)))`` where ``F`` is the map the backbone pools (the deepest
stage of :func:`~pand.networks.stages.default_stages`, or the stage ``method.stages`` names; or its pooled feature,
seen as a 1 x 1 map) and ``head`` is a projection into the teacher's embedding width ``D``: 1x1 conv, BatchNorm,
ReLU, dropout, 1x1 conv, BatchNorm. On a 1 x 1 map those 1x1 convolutions are exactly an MLP, which is the head
for backbones whose spatial map is not wanted (``head="mlp"``). ``head="linear"`` is CLIP's own image projection:
``e = norm(W h + b)`` with ``h`` the backbone's pooled feature (global average pooling of the last feature map for
CNNs, the library's own pooling for ViTs) and dropout before ``W``. It is the head that open_clip's timm image tower
computes (``timm_proj: linear``, ``timm_proj_bias: true``), so such a student exports as an
open_clip model (``pand export format=open_clip``); ``conv`` and ``mlp`` apply a ReLU (``conv`` before pooling) that
no open_clip image tower has.

It has no class-specific weights. Its classifier is its *vocabulary*: a ``C x D`` text matrix (the teacher's text
embeddings of the class names, averaged over prompt templates), and the logits are ``s * e @ T^T``. Any list of
names becomes a classifier by swapping the vocabulary (:meth:`OpenVocabStudent.set_vocabulary`); the matrix of the
training classes is a buffer saved with the weights, so a checkpoint classifies its own classes without the teacher.

Optional text-conditioned fusion changes the visual tokens for each query text before the head, so every
(image, class) pair gets its own embedding ``e(x | t_c)`` and the logit is ``s * e(x | t_c) . T_c``:

* ``film``: ``F' = (1 + gamma(t)) * F + beta(t)`` with ``gamma, beta`` linear in the class text embedding;
* ``cross_attention``: every visual token attends over the per-token text features of the class prompt (all its
  tokens up to the end-of-text token, not one pooled vector: with a single key, softmax is constantly 1 and the
  attention degenerates to adding a projected text vector), ``F' = F + out(Attn(F, tokens))``.

Both start as the identity (``gamma``, ``beta`` and ``out`` are zero-initialised), so fusion begins from the plain
student. Fusion costs one head pass per (image, class) pair; the backbone still runs once per image.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError
from pand.networks.stages import StageTap, check_stage_names, default_stages
from pand.students.factory import Student

HEADS = ("conv", "mlp", "linear")
FUSIONS = ("none", "film", "cross_attention")

# Upper bound on (image, class) pairs per fused head pass, to keep memory flat for large vocabularies.
_PAIRS_PER_CHUNK = 4096


def projection_head(in_channels: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """KDEOV's projection: 1x1 conv, BN, ReLU, dropout, 1x1 conv, BN (an MLP on a 1 x 1 map)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, embed_dim, kernel_size=1, bias=False),
        nn.BatchNorm2d(embed_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Conv2d(embed_dim, embed_dim, kernel_size=1, bias=False),
        nn.BatchNorm2d(embed_dim),
    )


def linear_head(in_channels: int, embed_dim: int, dropout: float) -> nn.Sequential:
    """CLIP's image projection on the pooled feature: dropout, then a Linear with bias.

    The children are named as in open_clip's ``TimmModel.head`` (``drop``, ``proj``), so the weights are its
    ``visual.head.proj.*`` as they are."""
    return nn.Sequential(OrderedDict(drop=nn.Dropout(dropout), proj=nn.Linear(in_channels, embed_dim, bias=True)))


class FiLMFusion(nn.Module):
    """``F' = (1 + gamma(t)) * F + beta(t)`` on visual tokens ``[N, P, c]``; ``t`` is a ``[N, D]`` text embedding."""

    def __init__(self, channels: int, text_dim: int) -> None:
        super().__init__()
        self.to_gamma_beta = nn.Linear(text_dim, 2 * channels)
        nn.init.zeros_(self.to_gamma_beta.weight)
        nn.init.zeros_(self.to_gamma_beta.bias)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, text_tokens=None, text_mask=None) -> torch.Tensor:
        gamma, beta = self.to_gamma_beta(text.to(tokens.dtype)).unsqueeze(1).chunk(2, dim=-1)
        return (1 + gamma) * tokens + beta


class CrossAttentionFusion(nn.Module):
    """Visual tokens ``[N, P, c]`` attend over the text tokens ``[N, L, D]`` of their query (padding masked)."""

    def __init__(self, channels: int, text_dim: int, heads: int = 4) -> None:
        super().__init__()
        heads = max(1, min(heads, channels))
        while channels % heads:
            heads -= 1
        self.norm = nn.LayerNorm(channels)
        self.attn = nn.MultiheadAttention(channels, heads, kdim=text_dim, vdim=text_dim, batch_first=True)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, tokens: torch.Tensor, text: torch.Tensor, text_tokens=None, text_mask=None) -> torch.Tensor:
        if text_tokens is None:
            raise ConfigError("cross-attention fusion needs per-token text features of the vocabulary")
        keys = text_tokens.to(tokens.dtype)
        pad = None if text_mask is None else ~text_mask.bool()
        attended, _ = self.attn(self.norm(tokens), keys, keys, key_padding_mask=pad, need_weights=False)
        return tokens + self.out(attended)


def _head_stage(student: Student, head: str, stages: Sequence[str] | None, input_size: Sequence[int]) -> str | None:
    """The backbone path of the map the conv head reads (None for the heads on the pooled feature)."""
    if head != "conv":
        if stages:
            raise ConfigError(f"method.stages names the map the conv head reads, and method.head={head} reads the "
                              "pooled feature: drop method.stages or set method.head=conv")
        return None
    if not stages:
        return default_stages(student.backbone, input_size)[-1]
    path = check_stage_names(student, stages, "method.stages")[-1]
    if not path.startswith("backbone."):
        pooled = "backbone." + default_stages(student.backbone, input_size)[-1]
        raise ConfigError(f"method.stages={list(stages)}: the conv head reads a map of the backbone, a path starting "
                          f"with 'backbone.' (such as {pooled}, the map it pools)")
    return path[len("backbone."):]


class OpenVocabStudent(nn.Module):
    """A backbone, a projection into the teacher space, optional text fusion, and a vocabulary to classify with.

    Args:
        student: a pand :class:`~pand.students.Student`; its backbone is kept, its linear classifier is not.
        embed_dim: ``D``, the teacher's embedding width.
        head: ``conv`` (the seed's head on the last feature map, or token sequence), ``mlp`` (on pooled features) or
            ``linear`` (dropout and a Linear with bias on pooled features: CLIP's projection, exportable to open_clip).
        dropout: dropout inside the head.
        fusion: ``none``, ``film`` or ``cross_attention``.
        logit_scale: ``s`` of the cosine logits.
        vocabulary: the ``C x D`` class text matrix (L2-normalised) the logits are computed against.
        input_size: ``(3, H, W)`` of the run's images, to size the head with a dry run.
        stages: ``head="conv"`` only: student stage paths (``backbone.features.13``, as ``method.stages`` of the other
            methods) whose last is the map the head reads; None: the map the backbone pools, the deepest stage
            :func:`~pand.networks.stages.default_stages` finds.
    """

    def __init__(
        self,
        student: Student,
        embed_dim: int,
        *,
        head: str = "conv",
        dropout: float = 0.1,
        fusion: str = "none",
        logit_scale: float = 1 / 0.07,
        vocabulary: torch.Tensor | None = None,
        input_size: Sequence[int] = (3, 224, 224),
        fusion_heads: int = 4,
        stages: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"open-vocabulary head must be one of {HEADS}, got {head!r}")
        if fusion not in FUSIONS:
            raise ConfigError(f"open-vocabulary fusion must be one of {FUSIONS}, got {fusion!r}")
        self.name = student.name
        self.backbone = student.backbone
        self.head_kind, self.fusion_kind = head, fusion
        self.embed_dim = int(embed_dim)
        input_size = tuple(int(s) for s in input_size)
        self.stage = _head_stage(student, head, stages, input_size)
        channels = self._measure_channels(input_size) if head == "conv" else student.feature_dim
        make_head = linear_head if head == "linear" else projection_head
        self.head = make_head(channels, self.embed_dim, float(dropout))
        if fusion == "film":
            self.fusion: nn.Module | None = FiLMFusion(channels, self.embed_dim)
        elif fusion == "cross_attention":
            self.fusion = CrossAttentionFusion(channels, self.embed_dim, heads=fusion_heads)
        else:
            self.fusion = None
        self.register_buffer("logit_scale", torch.tensor(float(logit_scale)))
        vocab = torch.zeros(0, self.embed_dim) if vocabulary is None else vocabulary.detach().float()
        self.register_buffer("vocabulary", F.normalize(vocab, dim=-1) if len(vocab) else vocab)
        # Per-token text features of the vocabulary, for cross-attention only (saved with it when set).
        self.register_buffer("vocabulary_tokens", None)
        self.register_buffer("vocabulary_mask", None)

    @classmethod
    def from_state(cls, student: Student, state: dict[str, torch.Tensor], options: dict,
                   input_size: Sequence[int]) -> OpenVocabStudent:
        """Rebuild a trained open-vocabulary student from its saved weights and method options (no teacher)."""
        vocab = state["vocabulary"]
        model = cls(student, int(vocab.shape[1]), head=options.get("head", "conv"),
                    dropout=float(options.get("dropout", 0.1)), fusion=options.get("fusion", "none"),
                    fusion_heads=int(options.get("fusion_heads", 4)), input_size=input_size,
                    stages=options.get("stages"))
        model.set_vocabulary(vocab, state.get("vocabulary_tokens"), state.get("vocabulary_mask"))
        model.load_state_dict(state)
        return model

    # -- the visual side ---------------------------------------------------------------------------------------------
    def _measure_channels(self, input_size: tuple[int, ...]) -> int:
        was = self.backbone.training
        self.backbone.eval()
        try:
            with torch.no_grad():
                tokens = self.visual_tokens(torch.zeros(1, *input_size))
        finally:
            self.backbone.train(was)
        return int(tokens.shape[-1])

    def visual_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, P, c]``: the last stage's positions (``head=conv``), or the pooled feature as one token (``mlp``,
        ``linear``)."""
        if self.stage is None:
            return self.backbone(images).unsqueeze(1)
        with StageTap(self.backbone, [self.stage]) as tap:
            self.backbone(images)
            (feature,) = tap.take()
        if feature.dim() == 4:  # [B, c, H, W] map -> positions
            return feature.flatten(2).transpose(1, 2)
        if feature.dim() == 3:  # [B, N, c] tokens (ViT, Mixer)
            return feature
        raise ConfigError(f"stage {self.stage!r} of student {self.name!r} gives {tuple(feature.shape)}, neither a map "
                          "nor a token sequence; use method.head=mlp")

    def _project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens ``[N, P, c]`` -> normalised embeddings ``[N, D]`` (1x1 convs over the P positions, then mean; the
        linear head reads the one pooled token)."""
        if self.head_kind == "linear":
            return F.normalize(self.head(tokens.mean(dim=1)).float(), dim=-1)
        x = self.head(tokens.transpose(1, 2).unsqueeze(-1))  # [N, D, P, 1]
        return F.normalize(x.mean(dim=(2, 3)).float(), dim=-1)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The unconditioned image embedding ``e`` (``[B, D]``, L2-normalised): what distillation and retrieval use
        when there is no fusion."""
        return self._project(self.visual_tokens(images))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The image embedding, as the feature a t-SNE plot (or any feature consumer) reads."""
        return self.embed(images)

    # -- classification ----------------------------------------------------------------------------------------------
    def set_vocabulary(self, text_embeds: torch.Tensor, tokens: torch.Tensor | None = None,
                       mask: torch.Tensor | None = None) -> None:
        """Classify among new classes: their ``C x D`` text embeddings (and per-token features for cross-attention)."""
        if text_embeds.dim() != 2 or text_embeds.shape[1] != self.embed_dim:
            raise ConfigError(f"a vocabulary is a C x {self.embed_dim} text matrix, got {tuple(text_embeds.shape)}")
        device = self.logit_scale.device
        self.vocabulary = F.normalize(text_embeds.detach().float(), dim=-1).to(device)
        self.vocabulary_tokens = None if tokens is None else tokens.detach().float().to(device)
        self.vocabulary_mask = None if mask is None else mask.detach().bool().to(device)

    @property
    def num_classes(self) -> int:
        return int(self.vocabulary.shape[0])

    def similarity(self, tokens: torch.Tensor, text: torch.Tensor | None = None,
                   text_tokens: torch.Tensor | None = None, text_mask: torch.Tensor | None = None, *,
                   embeds: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, C]`` cosines of visual tokens with a text matrix (the vocabulary unless given): ``e . T_c``, or
        ``e(x | t_c) . T_c`` with fusion. ``embeds``: the unconditioned embeddings of ``tokens``, if already made."""
        if text is None:
            text, text_tokens, text_mask = self.vocabulary, self.vocabulary_tokens, self.vocabulary_mask
        if text.shape[0] == 0:
            raise ConfigError("the open-vocabulary student has no vocabulary yet: give it class text embeddings with "
                              "set_vocabulary(...)")
        if self.fusion is not None:
            return self.fused_similarity(tokens, text, text_tokens, text_mask)
        return (self._project(tokens) if embeds is None else embeds) @ text.float().t()

    def fused_similarity(self, tokens: torch.Tensor, text: torch.Tensor, text_tokens: torch.Tensor | None,
                         text_mask: torch.Tensor | None) -> torch.Tensor:
        """``[B, C]`` cosines ``e(x_b | t_c) . T_c``: one fused head pass per (image, class) pair, in chunks."""
        b, c = tokens.shape[0], text.shape[0]
        per = max(1, _PAIRS_PER_CHUNK // max(1, b))
        columns = []
        for start in range(0, c, per):
            sl = slice(start, min(c, start + per))
            k = sl.stop - sl.start
            vis = tokens.unsqueeze(1).expand(b, k, *tokens.shape[1:]).reshape(b * k, *tokens.shape[1:])
            txt = text[sl].unsqueeze(0).expand(b, k, -1).reshape(b * k, -1)
            tt = tm = None
            if text_tokens is not None:
                tt = text_tokens[sl].unsqueeze(0).expand(b, *text_tokens[sl].shape).reshape(b * k, *text_tokens.shape[1:])
            if text_mask is not None:
                tm = text_mask[sl].unsqueeze(0).expand(b, *text_mask[sl].shape).reshape(b * k, -1)
            fused = self.fusion(vis, txt, tt, tm)
            e = self._project(fused).view(b, k, -1)
            columns.append((e * F.normalize(text[sl].float(), dim=-1).unsqueeze(0)).sum(-1))
        return torch.cat(columns, dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits against the vocabulary: ``s * e @ T^T`` (or the fused ``s * e(x | t_c) . T_c``)."""
        return self.logit_scale.float() * self.similarity(self.visual_tokens(images))
