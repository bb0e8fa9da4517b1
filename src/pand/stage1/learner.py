"""CoOp prompt learner (PAND stage 1, PSC) on a frozen open_clip text tower.

The prompt of class ``c`` is ``[SOS] v_1 ... v_M [CLASS TOKENS] . [EOS]`` (position ``"end"``), or with the class
tokens between the two context halves (``"middle"``) or before the context (``"front"``). The ``v_i`` are the only
trainable tensor (:attr:`PromptLearner.ctx`); everything else is the frozen teacher text tower, run on token
embeddings instead of token ids.

How the layout is found: every prompt is written as a sentence with one placeholder word per context token and
tokenised with the teacher's own tokenizer, twice, with two different placeholder words. The positions where the two
tokenisations differ are the context positions, so the class tokens, the trailing "." and the special tokens are
exactly what the tokenizer makes of the whole sentence (e.g. "Mr.." keeps its ".." token). With ``ctx_init`` the
context starts as the token embeddings of the phrase taken from the tokenised sentence ``f"{ctx_init} {name}."``,
hence ``learner()`` reproduces ``encode_text`` of that sentence.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError

__all__ = ["PromptLearner"]

_POSITIONS = ("end", "middle", "front")
_PLACEHOLDERS = ("X", "Y")


class _TextTower:
    """Plain (unregistered) references to the modules of an open_clip text tower and how it pools.

    Not an ``nn.Module`` on purpose: the learner must not own the teacher's parameters.
    """

    def __init__(self, clip_model: nn.Module) -> None:
        self.owner = clip_model
        text = getattr(clip_model, "text", None)
        if _has_text_modules(clip_model):
            # open_clip CLIP: the text modules sit directly on the model.
            src = clip_model
            self.attn_mask = getattr(clip_model, "attn_mask", None)
            self.pool_type = getattr(clip_model, "text_pool_type", "argmax")
            self.eos_id = getattr(clip_model, "text_eos_id", None)
            self.cls_emb = None
            self.use_pad_mask = False
            self.tower = None
            self.pad_id = 0
        elif text is not None and _has_text_modules(text):
            # open_clip CustomTextCLIP with a TextTransformer under model.text.
            src = text
            self.attn_mask = getattr(text, "attn_mask", None)
            self.pool_type = getattr(text, "pool_type", "argmax")
            self.eos_id = getattr(text, "eos_id", None)
            self.cls_emb = getattr(text, "cls_emb", None)
            self.use_pad_mask = bool(getattr(text, "use_pad_mask", False))
            self.tower = text
            self.pad_id = int(getattr(text, "pad_id", 0))
        else:
            what = type(text).__name__ if text is not None else type(clip_model).__name__
            hint = ""
            if text is not None and type(text).__name__ == "HFTextEncoder":
                hint = " Hugging Face text towers (open_clip HFTextEncoder) take input ids, not token embeddings, and "
                hint += "are not supported by CoOp prompt learning in pand."
            raise ConfigError(
                f"CoOp prompt learning needs an open_clip CLIP or CustomTextCLIP text tower with token_embedding, "
                f"positional_embedding, transformer, ln_final and text_projection; got {what}.{hint} Use a teacher "
                "with an open_clip TextTransformer text tower (e.g. ViT-B-16, convnext_xxlarge)."
            )
        self.token_embedding = src.token_embedding
        self.positional_embedding = src.positional_embedding
        self.transformer = src.transformer
        self.ln_final = src.ln_final
        self.text_projection = src.text_projection
        if self.pool_type not in ("argmax", "eos", "first", "last"):
            raise ConfigError(
                f"text pool type {self.pool_type!r} of this teacher gives no single text vector; CoOp needs one of "
                "argmax, eos, first, last"
            )
        if self.pool_type == "eos" and self.eos_id is None:
            raise ConfigError("the teacher pools text at its EOS token but has no eos id")
        self.context_length = int(self.positional_embedding.shape[0]) - (1 if self.cls_emb is not None else 0)
        self.width = int(self.token_embedding.weight.shape[1])

    def cast_dtype(self) -> torch.dtype:
        get = getattr(self.transformer, "get_cast_dtype", None)
        return get() if callable(get) else self.token_embedding.weight.dtype


def _has_text_modules(m: Any) -> bool:
    return isinstance(m, nn.Module) and all(
        isinstance(getattr(m, name, None), nn.Module)
        for name in ("token_embedding", "transformer", "ln_final")
    ) and isinstance(getattr(m, "positional_embedding", None), torch.Tensor) and hasattr(m, "text_projection")


class PromptLearner(nn.Module):
    """Learnable CoOp context in front of (or around) the class names, encoded by a frozen open_clip text tower.

    Args:
        clip_model: an open_clip ``CLIP`` or ``CustomTextCLIP`` (a :class:`pand.teachers.clip.ClipTeacher` is
            unwrapped). Its parameters are frozen (``requires_grad_(False)``) and it is put in eval mode.
        tokenizer: the open_clip tokenizer of that model.
        classnames: one name per class, in label order.
        n_ctx: number of context vectors M (ignored when ``ctx_init`` is given: M is then its token count).
        ctx_init: a phrase such as ``"a photo of a"`` whose token embeddings initialise the context.
        csc: one context per class (``ctx`` is ``[C, M, width]``) instead of a shared one (``[M, width]``).
        class_token_position: ``"end"``, ``"middle"`` or ``"front"``.

    ``forward()`` returns the ``[C, D]`` L2-normalised class text features (float32). The clip model is referenced,
    not registered: ``learner.parameters()`` yields only ``ctx`` and ``learner.state_dict()`` holds only ``ctx``;
    ``learner.to(device)`` also moves the referenced clip model.
    """

    def __init__(
        self,
        clip_model: nn.Module,
        tokenizer: Any,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
    ) -> None:
        super().__init__()
        inner = getattr(clip_model, "model", None)
        if isinstance(inner, nn.Module) and hasattr(clip_model, "encode_texts"):  # a ClipTeacher
            clip_model = inner
        if class_token_position not in _POSITIONS:
            raise ConfigError(f"class_token_position must be one of {_POSITIONS}, got {class_token_position!r}")
        classnames = [str(c) for c in classnames]
        if not classnames:
            raise ConfigError("PromptLearner needs at least one class name")
        if ctx_init is not None and not ctx_init.strip():
            ctx_init = None
        if ctx_init is None and (not isinstance(n_ctx, int) or n_ctx < 1):
            raise ConfigError(f"n_ctx must be a positive integer, got {n_ctx!r}")

        tt = _TextTower(clip_model)
        clip_model.requires_grad_(False)
        clip_model.eval()
        object.__setattr__(self, "_tt", tt)  # plain reference, not a submodule
        self.tokenizer = tokenizer
        self.classnames = list(classnames)
        self.csc = bool(csc)
        self.class_token_position = class_token_position
        self.ctx_init = ctx_init
        width = tt.width
        device = tt.token_embedding.weight.device

        if ctx_init is not None:
            ctx_init = " ".join(ctx_init.replace("_", " ").split())
            n_ctx = self._phrase_token_count(ctx_init)
        self.n_ctx = int(n_ctx)
        if self.class_token_position == "middle" and self.n_ctx < 2:
            raise ConfigError("class_token_position='middle' needs at least 2 context tokens")

        # Tokenise the prompts with two different placeholder words; they differ exactly at the context positions.
        tok = [self._tokenize([self._sentence(p, name) for name in classnames], classnames) for p in _PLACEHOLDERS]
        tokens = tok[0]
        is_ctx = tok[0] != tok[1]
        counts = is_ctx.sum(1)
        if not bool((counts == self.n_ctx).all()):
            bad = classnames[int((counts != self.n_ctx).nonzero()[0, 0])]
            raise ConfigError(
                f"the tokenizer does not map each of the {self.n_ctx} context placeholders of the prompt for class "
                f"{bad!r} to one token; this tokenizer is not supported for CoOp prompts"
            )
        ctx_pos = is_ctx.nonzero()[:, 1].view(len(classnames), self.n_ctx)  # row-major: ordered per class

        with torch.no_grad():
            embeds = tt.token_embedding(tokens.to(device)).to(tt.cast_dtype())  # [C, L, W]
            if ctx_init is not None:
                phrase_tok = self._tokenize([f"{ctx_init} {classnames[0]}."], classnames[:1])[0]
                end_tok = self._tokenize([self._sentence(_PLACEHOLDERS[0], classnames[0], "end")], classnames[:1])[0]
                end_alt = self._tokenize([self._sentence(_PLACEHOLDERS[1], classnames[0], "end")], classnames[:1])[0]
                end_pos = (end_tok != end_alt).nonzero()[:, 0]
                same = torch.ones_like(end_tok, dtype=torch.bool)
                same[end_pos] = False
                if end_pos.numel() != self.n_ctx or not torch.equal(phrase_tok[same], end_tok[same]):
                    raise ConfigError(
                        f"ctx_init {ctx_init!r} does not tokenise into {self.n_ctx} tokens that line up with the "
                        "class name; use a plain phrase such as 'a photo of a'"
                    )
                init = tt.token_embedding(phrase_tok[end_pos].to(device)).float()  # [M, W]
                ctx = init.unsqueeze(0).repeat(len(classnames), 1, 1) if self.csc else init.clone()
            else:
                shape = (len(classnames), self.n_ctx, width) if self.csc else (self.n_ctx, width)
                ctx = torch.empty(shape, device=device).normal_(0.0, 0.02)

        # Pooling position per prompt, from the token ids (the placeholders stand in for the context).
        if tt.pool_type == "argmax":
            pool_idx = tokens.argmax(dim=-1)
        elif tt.pool_type == "eos":
            pool_idx = (tokens == tt.eos_id).int().argmax(dim=-1)
        elif tt.pool_type == "first":
            pool_idx = torch.zeros(len(classnames), dtype=torch.long)
        else:  # last
            pool_idx = torch.full((len(classnames),), tokens.shape[1] - 1, dtype=torch.long)

        # With a causal mask, no padding mask and pooling at or before the EOT, tokens after the last EOT cannot
        # change the result: drop them (CoOp's 77-token prompts mostly hold padding).
        seq_len = tokens.shape[1]
        if (
            tt.attn_mask is not None
            and tt.cls_emb is None
            and not tt.use_pad_mask
            and tt.pool_type in ("argmax", "eos", "first")
        ):
            seq_len = int(max(int(pool_idx.max()), int(ctx_pos.max()))) + 1
        self.seq_len = seq_len

        self.ctx = nn.Parameter(ctx)
        # Token embeddings of the whole prompts (SOS/prefix, class tokens, ".", EOS, padding); the context
        # positions are overwritten in forward().
        self.register_buffer("token_embeds", embeds[:, :seq_len].detach().clone(), persistent=False)
        self.register_buffer("tokenized_prompts", tokens[:, :seq_len].to(device), persistent=False)
        self.register_buffer("ctx_positions", ctx_pos.to(device), persistent=False)
        self.register_buffer("pool_index", pool_idx.to(device), persistent=False)

    # ----------------------------------------------------------------------------------------------------------- #
    @property
    def text_tower(self) -> _TextTower:
        return self._tt

    @property
    def clip_model(self) -> nn.Module:
        return self._tt.owner

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def _sentence(self, placeholder: str, name: str, position: str | None = None) -> str:
        position = position or self.class_token_position
        m = self.n_ctx
        if position == "end":
            return " ".join([placeholder] * m + [name]) + "."
        if position == "front":
            return " ".join([name] + [placeholder] * m) + "."
        half = m // 2
        return " ".join([placeholder] * half + [name] + [placeholder] * (m - half)) + "."

    def _phrase_token_count(self, phrase: str) -> int:
        enc = getattr(self.tokenizer, "encode", None)
        if callable(enc):
            try:
                n = len(enc(phrase))
                if n > 0:
                    return n
            except Exception:  # noqa: BLE001 - fall back to counting non-pad tokens
                pass
        pad = self._tt.pad_id
        with_phrase = int((self.tokenizer([phrase]) != pad).sum())
        empty = int((self.tokenizer([""]) != pad).sum())
        if with_phrase - empty < 1:
            raise ConfigError(f"ctx_init {phrase!r} tokenises to no tokens")
        return with_phrase - empty

    def _tokenize(self, texts: list[str], names: list[str]) -> torch.Tensor:
        """Tokenise to the model's context length; a prompt that does not fit is a ConfigError naming the class."""
        tt = self._tt
        length = tt.context_length
        try:
            long = self.tokenizer(texts, context_length=length + 64)
        except TypeError:
            long = None
        if long is not None:
            overflow = (long[:, length:] != tt.pad_id).any(dim=1)
            if bool(overflow.any()):
                i = int(overflow.nonzero()[0, 0])
                needed = int((long[i] != tt.pad_id).nonzero().max()) + 1
                raise ConfigError(
                    f"class name {names[i]!r} is too long: its prompt {texts[i]!r} needs {needed} tokens but the "
                    f"teacher's text context length is {length}; shorten the name or use fewer context tokens"
                )
            return long[:, :length].long()
        tokens = self.tokenizer(texts)
        if tokens.shape[1] != length:
            raise ConfigError(
                f"the tokenizer makes {tokens.shape[1]} tokens per prompt but the text tower expects {length}"
            )
        return tokens.long()

    def _apply(self, fn, *args, **kwargs):  # noqa: ANN001 - nn.Module internals
        # .to(device) / .cuda() of the learner also moves the frozen text tower it references.
        super()._apply(fn, *args, **kwargs)
        owner = self._tt.owner
        if isinstance(owner, nn.Module):
            owner._apply(fn, *args, **kwargs)
        return self

    # ----------------------------------------------------------------------------------------------------------- #
    def prompt_embeddings(self) -> torch.Tensor:
        """The ``[C, L, width]`` token embeddings of the prompts with the current context spliced in."""
        base = self.token_embeds
        c, _, w = base.shape
        ctx = self.ctx.to(base.dtype)
        if ctx.dim() == 2:
            ctx = ctx.unsqueeze(0).expand(c, -1, -1)
        index = self.ctx_positions.unsqueeze(-1).expand(-1, -1, w)
        return base.scatter(1, index, ctx)

    def forward(self) -> torch.Tensor:
        tt = self._tt
        dtype = tt.cast_dtype()
        x = self.prompt_embeddings().to(dtype)
        c, seq_len, _ = x.shape
        attn_mask = tt.attn_mask
        if tt.cls_emb is not None:
            x = torch.cat([x, tt.cls_emb.to(x.dtype).view(1, 1, -1).expand(c, 1, -1)], dim=1)
            seq_len += 1
        if attn_mask is not None:
            attn_mask = attn_mask[:seq_len, :seq_len]
        if tt.use_pad_mask or tt.cls_emb is not None:
            add_mask = tt.tower._build_additive_mask(self.tokenized_prompts, seq_len, x.dtype)
            attn_mask = add_mask if attn_mask is None else attn_mask.unsqueeze(0) + add_mask
        x = x + tt.positional_embedding[:seq_len].to(dtype)
        x = tt.transformer(x, attn_mask=attn_mask)
        rows = torch.arange(c, device=x.device)
        if tt.cls_emb is not None:
            pooled = tt.ln_final(x[:, -1])
        else:
            x = tt.ln_final(x)
            pooled = x[rows, self.pool_index]
        proj = tt.text_projection
        if proj is not None:
            pooled = proj(pooled) if isinstance(proj, nn.Module) else pooled @ proj
        return F.normalize(pooled.float(), dim=-1)

    def extra_repr(self) -> str:
        return (
            f"n_cls={self.num_classes}, n_ctx={self.n_ctx}, csc={self.csc}, "
            f"position={self.class_token_position!r}, ctx_init={self.ctx_init!r}, seq_len={self.seq_len}"
        )

