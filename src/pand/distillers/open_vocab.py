"""Open-vocabulary student (KDEOV): distil the teacher's joint space, classify any names through its text tower.

The student (:class:`~pand.students.open_vocab.OpenVocabStudent`) embeds an image as ``e_s`` in the teacher's
``D``-wide space. Training minimises::

    L = distill_weight * L_distill(e_s, t_img) + align_weight * L_align
        + icl_weight * L_icl(e_s, t_img) + affinity_weight * L_affinity(e_s, t_img, T)
        + caption_weight * L_caption(e_s, t_cap)

* ``L_distill``: ``mean(1 - cos(e_s, t_img))`` (``distill=cosine``) or the MSE of the normalised vectors
  (``distill=l2``) against the teacher's image embedding of the same view. It needs no label.
* ``L_align``: InfoNCE of the image embeddings against the class text embeddings of the training classes with the
  labels as targets (:func:`pand.losses.label_infonce_loss`): images of the same class are never each other's
  negatives. With fusion, the similarities are the text-conditioned ones ``e(x | t_c) . T_c``.
* ``L_icl`` (on by default, weight 1: the best val score of every protocol of ``benchmarks/open_vocab_protocols.py``):
  CLIP-KD's interactive contrastive learning, InfoNCE of ``e_s`` against the teacher's image embeddings of the batch,
  the same image's as positive (:func:`pand.losses.interactive_contrastive_loss`).
* ``L_affinity`` (off by default): TinyCLIP's affinity mimicking / CLIP-KD's CRD, the KL from the teacher's to the
  student's similarity distributions over the training classes' text (image -> vocabulary) and over the batch's
  images (vocabulary -> images), averaged (:func:`pand.losses.affinity_mimicking_loss`).

* ``L_caption`` (off by default; image-caption data, ``data=captions``): CLIP's symmetric InfoNCE between the batch's
  ``e_s`` and the teacher's text embeddings ``t_cap`` of one caption per image (each epoch picks which, from the seed,
  epoch and index), the batch's other captions as negatives; images sharing a caption text are not each other's
  negatives (:func:`pand.losses.caption_infonce_loss`), at ``temperature``. The teacher embeds every training
  caption once per run (no template; or reads them from its cache): they are data, no augmentation changes them.

``L_icl`` and ``L_affinity`` use ``relation_temperature``, need no label, and read the unconditioned ``e_s`` (as
``L_distill`` and ``L_caption`` do, with fusion too).

Its classifier is the text matrix of the class names (teacher text tower, template ensemble); after training, any
list of names can replace it (``student.set_vocabulary``), which is what base-to-novel evaluation and retrieval do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from pand.data.mixing import mixing_enabled
from pand.distillers.base import Distiller, DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.errors import ConfigError
from pand.losses import (
    affinity_mimicking_loss,
    caption_infonce_loss,
    embedding_distill_loss,
    interactive_contrastive_loss,
    label_infonce_loss,
)
from pand.rules import BOOL, POSITIVE, WEIGHT, choice, integer, number
from pand.students import Student
from pand.students.open_vocab import FUSIONS, HEADS, OpenVocabStudent
from pand.teachers.outputs import IMAGE_EMBEDS
from pand.teachers.registry import kind_of


@register_distiller("openvocab")
class OpenVocab(Distiller):
    requires = frozenset({IMAGE_EMBEDS})
    label_terms = frozenset({"align"})
    needs_text_embeds = True
    #: The student embeds images in the teacher's joint space, so the engine adds the open-vocabulary report
    #: (base / novel / harmonic mean, text -> image retrieval) to the run.
    embeds_images = True
    option_rules = {
        "distill": choice("cosine", "l2"),
        "distill_weight": WEIGHT,
        "align_weight": WEIGHT,
        "temperature": POSITIVE,
        "symmetric": BOOL,
        "icl_weight": WEIGHT,
        "affinity_weight": WEIGHT,
        "relation_temperature": POSITIVE,
        "caption_weight": WEIGHT,
        "head": choice(*HEADS),
        "dropout": number(0, 1, high_open=True),
        "fusion": choice(*FUSIONS),
        "fusion_heads": integer(1),
    }

    #: The terms that read the teacher's image embedding of each sample, with their default weights.
    image_terms: ClassVar[Mapping[str, float]] = {"distill_weight": 1.0, "icl_weight": 1.0, "affinity_weight": 0.0}

    @classmethod
    def requires_for(cls, options: Mapping[str, Any]) -> frozenset[str]:
        # Without a term on the teacher's image embeddings only the class text embeddings are read: no teacher pass
        # per image.
        reads_images = any(float(options.get(k, v)) > 0 for k, v in cls.image_terms.items())
        return cls.requires if reads_images else frozenset()

    @classmethod
    def reads_text_tokens(cls, options: Mapping[str, Any]) -> bool:
        return options.get("fusion") == "cross_attention"

    @classmethod
    def reads_captions(cls, options: Mapping[str, Any]) -> bool:
        return float(options.get("caption_weight", 0.0)) > 0

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[str]:
        errors = []
        method = config.get("method") or {}
        # every term with its default weight, in the order the message names them
        weights = {"distill_weight": 1.0, "align_weight": 1.0, **cls.image_terms, "caption_weight": 0.0}
        if all(float(method.get(k, v)) == 0 for k, v in weights.items()):
            names = " and ".join(f"method.{k}=0" for k in weights)
            errors.append(f"{names} leave the open-vocabulary student nothing to learn; set at least one above 0")
        if mixing_enabled(config.get("mixing")):
            errors.append("method 'openvocab' aligns each image with its class text (labels as InfoNCE targets), "
                          "which a Mixup/CutMix blend of two classes does not have; set mixing.mixup_alpha=0 and "
                          "mixing.cutmix_alpha=0")
        try:
            kind = kind_of(config)
        except ConfigError:
            kind = None  # an unknown teacher.kind, which the teacher checks refuse
        if kind is not None and not kind.has_text:
            errors.append(f"method 'openvocab' distils a CLIP teacher's joint image-text space; a {kind.name} teacher "
                          "has no text tower (use teacher.kind=clip)")
        return errors

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        distill: str = "cosine",
        distill_weight: float = 1.0,
        align_weight: float = 1.0,
        temperature: float = 0.07,
        symmetric: bool = True,
        icl_weight: float = 1.0,
        affinity_weight: float = 0.0,
        relation_temperature: float = 0.07,
        head: str = "conv",
        dropout: float = 0.1,
        fusion: str = "none",
        fusion_heads: int = 4,
        caption_weight: float = 0.0,
        stages: Sequence[str] | None = None,
    ) -> None:
        super().__init__(student, num_classes, context)
        embedding_distill_loss(torch.zeros(1, 2), torch.ones(1, 2), distill)  # refuse an unknown kind now
        self.distill, self.distill_weight, self.align_weight = distill, float(distill_weight), float(align_weight)
        self.temperature, self.symmetric = float(temperature), bool(symmetric)
        self.icl_weight, self.affinity_weight = float(icl_weight), float(affinity_weight)
        self.relation_temperature = float(relation_temperature)
        self.caption_weight = float(caption_weight)
        if self.affinity_weight > 0 and context.vocabulary_for_selection_only:
            raise ConfigError("method.affinity_weight > 0 trains on the class text embeddings, and the only \"classes\" "
                              "of a captions run are its val captions, kept for model selection; set "
                              "method.affinity_weight=0 (method.caption_weight trains on the training captions)")
        if self.caption_weight > 0:
            if context.caption_embeds is None:
                raise ConfigError("method.caption_weight > 0 needs the teacher's embeddings of the training images' "
                                  "captions (TeacherContext.caption_embeds): train on image-caption data "
                                  "(data=captions)")
            # Teacher outputs: move with the module, never saved in checkpoints.
            self.register_buffer("caption_embeds", context.caption_embeds.detach().half().clone(), persistent=False)
        # An instance-level ``requires``: what the engine asks the teacher source for with these options.
        self.requires = self.requires_for({"distill_weight": self.distill_weight, "icl_weight": self.icl_weight,
                                           "affinity_weight": self.affinity_weight})
        self.student = OpenVocabStudent(
            student, int(context.embed_dim), head=head, dropout=dropout, fusion=fusion, fusion_heads=fusion_heads,
            logit_scale=float(context.logit_scale), vocabulary=self.text_embeds,
            input_size=getattr(student, "input_size", None) or (3, 224, 224), stages=stages,
        )
        if fusion == "cross_attention":
            if context.text_tokens is None:
                raise ValueError("cross-attention fusion needs the teacher's per-token class text features "
                                 "(TeacherContext.text_tokens)")
            self.student.set_vocabulary(self.text_embeds, context.text_tokens, context.text_token_mask)

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        student = self.student
        tokens = student.visual_tokens(batch["image"])
        embeds = student._project(tokens)
        similarity = student.similarity(tokens, embeds=embeds)
        losses: dict[str, torch.Tensor] = {}
        if self.distill_weight > 0:
            losses["distill"] = self.distill_weight * embedding_distill_loss(embeds, teacher[IMAGE_EMBEDS],
                                                                             self.distill)
        if self.align_weight > 0:
            # labelled samples only: an unlabelled image has no class text to align with (the distillation term
            # above already covers it)
            mask = self.labelled(batch)
            align = (label_infonce_loss(similarity[mask], batch["label"][mask], self.temperature, self.symmetric)
                     if bool(mask.any()) else similarity.sum() * 0.0)
            losses["align"] = self.align_weight * align
        # The relational terms compare the student with the teacher only, so every sample trains them, labelled or not.
        if self.icl_weight > 0:
            losses["icl"] = self.icl_weight * interactive_contrastive_loss(embeds, teacher[IMAGE_EMBEDS],
                                                                           self.relation_temperature)
        if self.affinity_weight > 0:
            # W is the training classes' text only: the vocabulary the student is trained on, never a held-out name
            losses["affinity"] = self.affinity_weight * affinity_mimicking_loss(
                embeds, teacher[IMAGE_EMBEDS], self.text_embeds, self.relation_temperature)
        if self.caption_weight > 0:
            ids = batch["caption"]
            has = ids >= 0  # an image without a caption (beside captioned ones) has nothing to align with
            losses["caption"] = self.caption_weight * (
                caption_infonce_loss(embeds[has], self.caption_embeds[ids[has]], ids[has], self.temperature)
                if bool(has.any()) else embeds.sum() * 0.0)
        return DistillerOutput(student.logit_scale * similarity, losses)
