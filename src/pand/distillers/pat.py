"""PAT (prompt-based heterogeneous distillation, ICCV 2025): logit KD, plus a teacher that adapts to the student
through feedback prompts and a student whose stages are compared with it through region-aware attention.

Three additions on top of logit KD (building blocks in :mod:`pand.distillers.pat_modules`):

1. Feedback prompts inside the teacher. Before each distilled teacher stage ``i`` a prompt block rewrites the stage
   input: ``x_i <- x_i + beta_i * prompt_i(fuse(x_i, f_i))``, with ``beta_i`` a learnable scalar starting at 0 (the
   prompted teacher starts out exactly the plain one) and ``f_i`` the feedback: the previous step's detached
   difference (aligned student feature - prompted teacher feature) at that stage, averaged over the batch. The
   prompts run as forward pre-hooks on the teacher's stage modules and act only during PAT's own prompted pass; the
   teacher's weights stay frozen. A stage input passed channels-last (Swin) or sequence-first is prompted in that
   order, found by a dry run that matches each stage's raw output with pand's stage feature.
2. Region-aware attention. Each chosen student stage becomes ``grid x grid`` (default 4 x 4 = 16) region tokens of
   width ``embed_dim`` (default 512); the tokens of all stages, with a learned stage embedding, are mixed by
   ``num_heads``-head self-attention (residual + LayerNorm).
3. Per-stage aligners map each stage's tokens to the shape of its paired teacher stage (CNN map or ViT/MLP tokens,
   class token included).

Student and teacher stages pair deepest-first: of the student's ``stages`` and the teacher's ``teacher_stages``
(indices into the teacher's stages; default all of them), the deepest ``n`` of each, ``n`` the smaller count. The
paired teacher stages are the prompted ones. The loss per step, ``z_s`` the student's logits, ``z_t`` the plain
teacher's (from the engine's teacher pass), ``z_p`` and ``t_i`` the prompted teacher's logits and stage features,
``a_i`` the aligned student features:

``L = ce_weight * CE(z_s, y) + kd_weight * T^2 KL(softmax(z_t/T) || softmax(z_s/T))
      + mse_weight * sum_i HCL(a_i, t_i) + reg_weight * T^2 KL(softmax(z_t/T) || softmax(z_p/T))``.

The regulariser is KD with the prompted teacher in the student's place: the plain teacher's distribution is the
target, so the prompts may make the teacher's features student-friendly but not change what it predicts. HCL
(:func:`pand.losses.hcl_loss`) is MSE at full resolution plus pooled MSEs at 4 x 4, 2 x 2, 1 x 1 with weights
1/2, 1/4, 1/8, normalised. Its gradient reaches both sides, as in PAT: the student, attention and aligners move
towards the prompted teacher, and the prompts move the teacher's features towards the student. The regulariser
trains only the prompts, the KD and CE terms only the student. A CLIP teacher's logits are its zero-shot ones
(learned CoOp features when given).

Cost: the teacher runs twice per training step, plain (without gradients, by the engine) and then prompted with
gradients flowing back through it to the prompts, so PAT cannot use a teacher cache and costs roughly 3x KD per
step with real-size networks (with toy ones the 512-wide attention dominates instead). The prompts, attention and
aligners are training-only: saved in checkpoints (with the feedback, so a resume continues it), never part of the
exported student. The teacher itself is never a submodule of the distiller, so neither checkpoints nor DDP ever hold it.

HCL compares raw features, so its scale, and the gradient of each ``beta`` (a sum over a whole feature map), grow
with the square of the teacher's feature scale: with a teacher whose stage features are large (an untrained or
diverged one) and a high SGD learning rate the prompts can blow the prompted teacher up within a few steps; lower
``mse_weight`` or the learning rate then. The logged ``pat_beta`` and ``pat_prompt_shift`` (relative change of the
teacher's stage features) show how far the prompts have moved the teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.pat_modules import (
    Aligner,
    Layout,
    PromptBlock,
    PromptHooks,
    RegionAttention,
)
from pand.distillers.registry import register_distiller
from pand.errors import ConfigError
from pand.losses import hcl_loss, kd_loss
from pand.networks.stages import (
    CHANNELS_LAST,
    SEQUENCE_FIRST,
    StageTap,
    check_stage_names,
    default_stages,
    pair_deepest,
    require_input_size,
    stage_shapes,
    to_pand_layout,
)
from pand.rules import POSITIVE, WEIGHT, integer
from pand.students import Student
from pand.teachers.frozen import FrozenTeacher, TeacherRef
from pand.teachers.outputs import IMAGE_EMBEDS, LOGITS, STAGE_FEATURES


def _raw_order(raw: torch.Tensor, pand: torch.Tensor) -> str | None:
    """The order in which a stage passed ``raw``, given the same tensor in pand's layout (``pand``)."""
    for order in {4: (None, CHANNELS_LAST), 3: (None, SEQUENCE_FIRST)}.get(raw.dim(), (None,)):
        view = to_pand_layout(raw, order)
        if view.shape == pand.shape and torch.equal(view, pand):
            return order
    raise ConfigError(f"cannot match a teacher stage output of shape {tuple(raw.shape)} to its stage feature of shape "
                      f"{tuple(pand.shape)}")


def _stage_inputs(teacher: FrozenTeacher, names: Sequence[str], image_size: Sequence[int]):
    """Per stage of ``names``: the pand-layout per-sample shape of its input, the order the teacher passes that input
    in, and the per-sample shape of its stage feature; from one dry run without gradients.

    The order is found by matching values, not guessed from shapes (a channels-last 8 x 8 x 8 map has the shape of a
    channels-first one): the raw output of each stage is compared with the stage feature pand made of it, on random
    images of two samples (so a batch dimension cannot pass for another). A stage takes its input in the order it
    returns its output (a Swin stage keeps maps channels-last, an open_clip block keeps its transformer's order);
    a stage whose input has another rank than its output (a patch embedding) gets pand's order for that rank.
    """
    modules = dict(teacher.stage_root.named_modules())
    raw_in: dict[str, torch.Tensor] = {}
    raw_out: dict[str, torch.Tensor] = {}

    def keep_input(name: str):
        def keep(module, args, kwargs):
            if args and torch.is_tensor(args[0]):
                raw_in[name] = args[0]

        return keep

    def keep_output(name: str):
        def keep(module, args, output):
            raw_out[name] = output[0] if isinstance(output, (tuple, list)) else output

        return keep

    handles = [modules[n].register_forward_pre_hook(keep_input(n), with_kwargs=True) for n in names]
    handles += [modules[n].register_forward_hook(keep_output(n)) for n in names]
    try:
        gen = torch.Generator().manual_seed(0)
        images = torch.randn(2, *image_size, generator=gen).to(teacher.device)
        # the teacher's own normalisation: only the size conversion matters here
        images = teacher.prepare_images(images, teacher.mean, teacher.std)
        with torch.no_grad():
            feats = dict(zip(teacher.stage_names, teacher.outputs(images, {STAGE_FEATURES})[STAGE_FEATURES]))
    finally:
        for handle in handles:
            handle.remove()
    missing = [n for n in names if n not in raw_in]
    if missing:
        raise ConfigError(f"teacher stage {missing[0]!r} takes no positional tensor input; PAT's prompts need one "
                          "(choose other teacher.stages)")
    result = []
    for n in names:
        order, x = _raw_order(raw_out[n], feats[n]), raw_in[n]
        if x.dim() != raw_out[n].dim():
            order = SEQUENCE_FIRST if x.dim() == 3 and x.shape[1] == 2 and x.shape[0] != 2 else None
        result.append((tuple(to_pand_layout(x, order).shape[1:]), order, tuple(feats[n].shape[1:])))
    return result


@register_distiller("pat")
class PAT(Distiller):
    requires = frozenset({LOGITS, STAGE_FEATURES})
    needs_teacher_model = True
    option_rules = {"temperature": POSITIVE, "ce_weight": WEIGHT, "kd_weight": WEIGHT, "mse_weight": WEIGHT,
                    "reg_weight": WEIGHT, "embed_dim": integer(1), "num_heads": integer(1), "grid": integer(1),
                    "se_ratio": integer(1)}

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[str]:
        method = config.get("method") or {}
        errors = []
        chosen = method.get("teacher_stages")
        if chosen is not None and (not isinstance(chosen, (list, tuple)) or not chosen or any(
                isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in chosen)
                or list(chosen) != sorted(set(chosen))):
            errors.append(f"method.teacher_stages={chosen} is not allowed: expected null (every teacher stage) or a "
                          "non-empty increasing list of stage indices >= 0")
        dim, heads = method.get("embed_dim", 512), method.get("num_heads", 8)
        if isinstance(dim, int) and isinstance(heads, int) and heads > 0 and dim % heads:
            errors.append(f"method.embed_dim={dim} is not a multiple of method.num_heads={heads}")
        return errors

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 1.0,
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        mse_weight: float = 1.0,
        reg_weight: float = 1.0,
        stages: Sequence[str] | None = None,
        teacher_stages: Sequence[int] | None = None,
        embed_dim: int = 512,
        num_heads: int = 8,
        grid: int = 4,
        se_ratio: int = 16,
    ) -> None:
        super().__init__(student, num_classes, context)
        self.temperature = float(temperature)
        self.ce_weight, self.kd_weight = float(ce_weight), float(kd_weight)
        self.mse_weight, self.reg_weight = float(mse_weight), float(reg_weight)
        teacher = None if context is None else context.teacher
        if teacher is None or not context.stage_names or not context.stage_shapes:
            raise ConfigError("pat trains prompts inside the teacher: it needs the live teacher model and its stages")
        input_size = require_input_size(student, "pat")
        # Outside the module tree: the teacher must never become a submodule (checkpoints, DDP, .parameters()).
        self._teacher = TeacherRef(teacher)
        self._mean = tuple(context.input_mean or teacher.mean)
        self._std = tuple(context.input_std or teacher.std)

        if stages:
            s_names = check_stage_names(student, stages, "method.stages")
        else:
            s_names = default_stages(student, input_size)
        count = len(context.stage_names)
        t_index = list(range(count)) if teacher_stages is None else [int(i) for i in teacher_stages]
        if not t_index or any(i < 0 or i >= count for i in t_index) or t_index != sorted(set(t_index)):
            raise ConfigError(f"method.teacher_stages={list(t_index)}: expected increasing indices in [0, {count}) "
                              f"of the teacher stages {context.stage_names}")
        self.stage_names, self.teacher_stage_index = pair_deepest(s_names, t_index)
        t_names = [context.stage_names[i] for i in self.teacher_stage_index]

        stage_io = _stage_inputs(teacher, t_names, input_size)
        t_out = [out for _, _, out in stage_io]
        expected = [tuple(context.stage_shapes[i]) for i in self.teacher_stage_index]
        if t_out != expected:
            raise ConfigError(f"at student.input_size={tuple(input_size)} the teacher stages have shapes {t_out}, but "
                              f"the run measured {expected}; the student's input size must be the run's image size")
        s_layouts = [Layout.of(s) for s in stage_shapes(student, self.stage_names, input_size)]
        self.teacher_layouts = [Layout.of(s) for s in t_out]
        self.region = RegionAttention(s_layouts, int(grid), int(embed_dim), int(num_heads))
        self.aligners = nn.ModuleList(Aligner(int(embed_dim), int(grid), layout) for layout in self.teacher_layouts)
        self.prompts = nn.ModuleList(PromptBlock(Layout.of(shape), out, int(se_ratio), order)
                                     for (shape, order, _), out in zip(stage_io, self.teacher_layouts))
        self._hooks = PromptHooks(teacher.stage_root, t_names, self.prompts)
        self._tap = StageTap(student, self.stage_names)
        self._tap.enabled = False
        self._clip = LOGITS not in teacher.provides
        if self._clip:
            text = context.prompt_embeds if context.prompt_embeds is not None else context.text_embeds
            if text is None or context.logit_scale is None:
                raise ConfigError("pat with a CLIP teacher needs its class text embeddings and logit scale")
            # Derived from the frozen teacher: moves with the module, never saved in checkpoints.
            self.register_buffer("class_text", text.detach().float().clone(), persistent=False)

    @property
    def teacher(self) -> FrozenTeacher:
        return self._teacher.value

    def prompted_teacher(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Class logits and paired stage features of the prompted teacher for a batch in the run's normalisation.

        Gradients flow to the prompts whenever grad mode is on; the teacher's weights never get any.
        """
        teacher = self.teacher
        x = teacher.prepare_images(images, self._mean, self._std)
        keys = {STAGE_FEATURES, IMAGE_EMBEDS if self._clip else LOGITS}
        self._hooks.active = True
        try:
            out = teacher.outputs(x, keys)
        finally:
            self._hooks.active = False
        logits = self.teacher_logits(out[IMAGE_EMBEDS], self.class_text) if self._clip else out[LOGITS]
        return logits, [out[STAGE_FEATURES][i] for i in self.teacher_stage_index]

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        images = batch["image"]
        self._tap.enabled = True
        try:
            logits = self.student(images)
            s_feats = self._tap.take()
        finally:
            self._tap.enabled = False
        plain = teacher[LOGITS]
        p_logits, p_feats = self.prompted_teacher(images)
        aligned = [aligner(tokens) for aligner, tokens in zip(self.aligners, self.region(s_feats))]
        hcl = sum(hcl_loss(a, t) for a, t in zip(aligned, p_feats))
        losses = {
            "ce": self.ce_weight * self.cross_entropy(logits, batch),
            "kd": self.kd_weight * kd_loss(logits, plain, self.temperature),
            "pat_mse": self.mse_weight * hcl,
            "pat_reg": self.reg_weight * kd_loss(p_logits, plain, self.temperature),
        }
        for prompt, a, t in zip(self.prompts, aligned, p_feats):
            prompt.remember(a - t)
        with torch.no_grad():
            # How far the prompts have moved the teacher's features (relative), and the prompt strengths: one sync.
            plain_feats = [teacher[STAGE_FEATURES][i].float() for i in self.teacher_stage_index]
            shift = torch.stack([(p.float() - q).norm() / q.norm().clamp_min(1e-12)
                                 for p, q in zip(p_feats, plain_feats)])
            beta = torch.stack([p.beta.detach().abs() for p in self.prompts])
            shift_mean, beta_mean = torch.stack([shift.mean(), beta.mean()]).tolist()
        logs = {"pat_beta": beta_mean, "pat_prompt_shift": shift_mean}
        return DistillerOutput(logits, losses, logs)
