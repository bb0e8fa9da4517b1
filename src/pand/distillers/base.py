"""The interface every distillation method implements.

A distiller owns the student and any trainable heads of its method, and turns a batch plus the teacher's outputs for
that batch into named loss terms. It never calls the teacher: the engine hands it the outputs it declared in
``requires`` (see :mod:`pand.teachers.source`), live or cached, and the class-level teacher data (text embeddings) at
construction. The training loss is the sum of the returned terms, each already multiplied by its weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pand.errors import ConfigError
from pand.rules import Rule
from pand.students import Student


@dataclass
class TeacherContext:
    """Class-level teacher data, computed once per run (never per step).

    A CLIP teacher fills ``embed_dim``, ``logit_scale`` and the text matrices; a classifier teacher its class count.
    Methods that read ``stage_features`` get the teacher's stage names and per-sample shapes (from a dry run at the
    run's input size). ``teacher`` is the live frozen teacher model, given only to methods that declare
    ``needs_teacher_model`` because they train modules inside it; ``input_mean``/``input_std`` are the normalisation
    of the batch images, which :meth:`~pand.teachers.FrozenTeacher.prepare_images` converts to the teacher's.
    """

    embed_dim: int | None = None
    logit_scale: float | None = None
    text_embeds: torch.Tensor | None = None  # C x D, L2-normalised, from the prompt templates
    prompt_embeds: torch.Tensor | None = None  # C x D learned CoOp text features (teacher.text_features), if given
    identity: dict[str, str] = field(default_factory=dict)
    num_classes: int | None = None
    # A teacher ensemble's member weights (summing to 1), for methods that read each member (``member_logits``).
    member_weights: list[float] | None = None
    stage_names: list[str] | None = None
    stage_shapes: list[tuple[int, ...]] | None = None
    teacher: Any = None  # a FrozenTeacher, for needs_teacher_model methods only; never registered as a submodule
    input_mean: tuple[float, ...] | None = None
    input_std: tuple[float, ...] | None = None
    # Per-token text features of the class prompts ([C, L, D]) and their [C, L] mask of real tokens, for methods
    # that attend over prompt tokens (``Distiller.reads_text_tokens``).
    text_tokens: torch.Tensor | None = None
    text_token_mask: torch.Tensor | None = None
    # The teacher's text embeddings of every caption of the training images ([M, D], L2-normalised, float16: COCO's
    # 590k captions at D=768 stay under 1 GB), row r for row r of the run's CaptionTable; a batch's ``caption`` key
    # holds each sample's row. Teacher outputs that no augmentation changes, so computed (or cached) once per run.
    caption_embeds: torch.Tensor | None = None
    # True when ``text_embeds`` are the val split's captions (a captions dataset has no classes; they stand in for
    # them to select the model): no training term may learn from them.
    vocabulary_for_selection_only: bool = False


@dataclass(frozen=True)
class Progress:
    """Where training stands, for schedules that change loss weights over time."""

    epoch: int
    max_epochs: int


@dataclass
class DistillerOutput:
    logits: torch.Tensor  # the student's class logits, for training accuracy
    losses: dict[str, torch.Tensor]  # weighted terms; the loss is their sum
    logs: dict[str, float] = field(default_factory=dict)  # extra scalars worth logging (weights, ...)


class Distiller(nn.Module):
    """Base class: the student plus the method's trainable heads.

    Subclasses set ``requires`` (per-sample teacher outputs, e.g. ``{"image_embeds"}``), ``needs_text_embeds`` if
    they read the teacher's class text embeddings, and implement :meth:`training_losses`.
    """

    name: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    needs_text_embeds: ClassVar[bool] = False
    # True for methods that train modules inside the teacher (PAT's prompts): they get the live teacher model in
    # ``context.teacher`` and cannot use a teacher cache.
    needs_teacher_model: ClassVar[bool] = False
    # Allowed values of the method's options (keys as in ``configs/method/<name>.yaml``, dotted for nested ones),
    # checked with every other setting before anything is built; see :mod:`pand.engine.config_checks`.
    option_rules: ClassVar[Mapping[str, Rule]] = {}
    # True for methods whose student embeds images in the teacher's joint space (classifying by a text matrix):
    # the engine then adds the open-vocabulary report (base / novel accuracy, retrieval) to the run.
    embeds_images: ClassVar[bool] = False
    # The loss terms that need a label: computed on the labelled samples of a batch only (0 in a batch without any);
    # every other term uses all samples, unlabelled training images (``data.unlabelled``) included.
    label_terms: ClassVar[frozenset[str]] = frozenset({"ce"})

    @classmethod
    def requires_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        """The teacher outputs the method reads with these options (``requires`` unless a term can be switched off,
        as NRKD's feature term: then the rest can come from a teacher cache)."""
        return cls.requires

    @classmethod
    def uses_teacher_with(cls, reads: frozenset[str]) -> bool:
        """Whether the method uses the teacher at all when it reads the per-sample outputs ``reads`` (its
        :meth:`requires_for` its options): those, the class text embeddings, or the teacher model itself. A method
        that uses none learns from labels alone."""
        return bool(reads) or cls.needs_text_embeds or cls.needs_teacher_model

    @classmethod
    def reads_text_features(cls, options: Mapping[str, Any]) -> bool:
        """Whether the method, with these options, uses learned CoOp text features (``teacher.text_features``)."""
        return False

    @classmethod
    def reads_text_tokens(cls, options: Mapping[str, Any]) -> bool:
        """Whether the method, with these options, attends over per-token text features of the class prompts."""
        return False

    @classmethod
    def reads_captions(cls, options: Mapping[str, Any]) -> bool:
        """Whether the method, with these options, reads the teacher's embeddings of the training images' captions
        (``TeacherContext.caption_embeds``, with the batch's ``caption`` rows)."""
        return False

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[str]:
        """Problems with the method's options in the context of the whole config (one message each)."""
        return []

    def __init__(self, student: Student, num_classes: int, context: TeacherContext | None = None) -> None:
        super().__init__()
        self.student = student
        self.num_classes = int(num_classes)
        self.context = context
        if self.needs_text_embeds:
            if context is None or context.text_embeds is None:
                raise ConfigError(f"method {self.name!r} needs the teacher's class text embeddings")
            if context.text_embeds.shape[0] != num_classes:
                raise ConfigError(
                    f"teacher text embeddings have {context.text_embeds.shape[0]} classes, the data has {num_classes}"
                )
            # Derived from the frozen teacher: moves with the module, never saved in checkpoints.
            self.register_buffer("text_embeds", context.text_embeds.detach().float().clone(), persistent=False)

    @property
    def uses_teacher(self) -> bool:
        # an instance's ``requires`` is already the one for its options (NRKD, openvocab narrow it)
        return self.uses_teacher_with(self.requires)

    @staticmethod
    def labelled(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` bool: which samples of the batch carry a label (unlabelled training images have label -1)."""
        mask = batch.get("labelled")
        return mask.bool() if mask is not None else batch["label"] >= 0

    @classmethod
    def cross_entropy(cls, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                      label_smoothing: float = 0.0) -> torch.Tensor:
        """Cross-entropy against the batch's labels, or against its soft labels when the engine mixed the batch
        (Mixup / CutMix, :mod:`pand.data.mixing`; their smoothing is already in the soft labels).

        The mean is over the labelled samples only: unlabelled ones neither add to it nor dilute it, so adding them
        to a batch leaves this term and its gradient unchanged. A batch without a labelled sample gives 0.
        """
        mask = cls.labelled(batch)
        if not bool(mask.any()):
            return logits.float().sum() * 0.0
        if not bool(mask.all()):
            logits = logits[mask]
            batch = {k: batch[k][mask] for k in ("label", "soft_label") if k in batch}
        if "soft_label" in batch:
            return F.cross_entropy(logits.float(), batch["soft_label"])
        return F.cross_entropy(logits.float(), batch["label"], label_smoothing=label_smoothing)

    @classmethod
    def teacher_soft_cross_entropy(cls, logits: torch.Tensor, batch: dict[str, torch.Tensor],
                                   teacher_logits: torch.Tensor) -> torch.Tensor | None:
        """Cross-entropy of the unlabelled samples against the teacher's class distribution ``softmax(z_t)``, mean over
        them; None when every sample has a label.

        The classifier term of an unlabelled sample, for methods whose teacher terms do not reach the classifier head
        (VL2Lite distils the student's features, never its head): without it the head would learn from the labelled
        samples alone, and in a label-free run not at all.
        """
        unlabelled = ~cls.labelled(batch)
        if not bool(unlabelled.any()):
            return None
        p_t = F.softmax(teacher_logits[unlabelled].float(), dim=-1)
        return -(p_t * F.log_softmax(logits[unlabelled].float(), dim=-1)).sum(-1).mean()

    @classmethod
    def target_classes(cls, batch: dict[str, torch.Tensor], teacher_logits: torch.Tensor) -> torch.Tensor:
        """One class per sample for terms built around a target class (DKD's split, OFA's target boost): the label
        of a labelled sample, the teacher's top-1 class of an unlabelled one (its pseudo-label)."""
        return torch.where(cls.labelled(batch), batch["label"], teacher_logits.argmax(-1))

    def teacher_logits(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The CLIP teacher's zero-shot logits ``s * t_img @ T_txt^T`` (template embeddings unless given)."""
        text = self.text_embeds if text_embeds is None else text_embeds
        return self.context.logit_scale * image_embeds.float() @ text.float().t()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Student logits; what validation, test and deployment use."""
        return self.student(images)

    def training_losses(
        self, batch: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor], progress: Progress
    ) -> DistillerOutput:
        raise NotImplementedError
