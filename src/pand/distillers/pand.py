"""PAND stage 2 (NSD): VL2Lite with learned CoOp text features, plus NLRD neighbourhood distillation.

``L = w_cls CE + (w_kd L_img + w_kd L_kd) / 2 + nlrd.weight * L_nlrd``. With ``use_coop`` the learned features
``T_ctx`` replace the template embeddings everywhere (teacher logits, the text condensation input, NLRD's teacher
logits). NLRD's neighbours are searched among the teacher logits of all processes under DDP (``nlrd.gather=all``),
or per process as the authors' code does (``nlrd.gather=local``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist

from pand.distillers.base import DistillerOutput, Progress, TeacherContext
from pand.distillers.registry import register_distiller
from pand.distillers.vl2lite import VL2Lite
from pand.errors import ConfigError
from pand.losses import nlrd_loss
from pand.rules import BOOL, WEIGHT, choice, integer, number
from pand.students import Student

NLRD_DEFAULTS = {"k": 3, "weight": 1.0, "gather": "all"}


def _gather_pool(student_logits: torch.Tensor, teacher_logits: torch.Tensor):
    """Logits of every process (student ones with gradients) and where this process's samples sit in them."""
    from torch.distributed.nn.functional import all_gather

    rank = dist.get_rank()
    pool_s = torch.cat(all_gather(student_logits.contiguous()), 0)
    pool_t = torch.cat(all_gather(teacher_logits.contiguous()), 0)
    b = student_logits.shape[0]
    self_index = torch.arange(rank * b, (rank + 1) * b, device=student_logits.device)
    return pool_s, pool_t, self_index


@register_distiller("pand")
class PAND(VL2Lite):
    option_rules = {
        **VL2Lite.option_rules,
        "linguistic_scale": number(0, optional=True),
        "use_coop": BOOL,
        "use_nlrd": BOOL,
        "nlrd.k": integer(1),
        "nlrd.weight": WEIGHT,
        "nlrd.gather": choice("all", "local"),
    }

    @classmethod
    def reads_text_features(cls, options: Mapping[str, Any]) -> bool:
        return bool(options.get("use_coop", True))

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> list[str]:
        method, batch = config.get("method") or {}, (config.get("data") or {}).get("batch_size")
        errors = []
        if method.get("use_coop", True) and not (config.get("teacher") or {}).get("text_features"):
            errors.append("method.use_coop=true needs teacher.text_features=/path/to/learned_text_features.safetensors "
                          "from `pand prompts ...` (PAND stage 1), or set method.use_coop=false")
        if method.get("use_nlrd", True) and isinstance(batch, int) and batch < 2:
            errors.append(f"method.use_nlrd=true with data.batch_size={batch}: NLRD needs at least 2 samples per "
                          "batch to find neighbours")
        return errors

    def __init__(
        self,
        student: Student,
        num_classes: int,
        context: TeacherContext | None = None,
        temperature: float = 2.0,
        linguistic_scale: float | None = None,
        weight_schedule: str = "code",
        use_coop: bool = True,
        use_nlrd: bool = True,
        nlrd: Mapping[str, Any] | None = None,
    ) -> None:
        # The authors' code scales linguistic KD by T^2/2 with template features and by T^2 with CoOp features;
        # null reproduces that per variant, a number fixes it.
        if linguistic_scale is None:
            linguistic_scale = 1.0 if use_coop else 0.5
        super().__init__(student, num_classes, context, temperature, linguistic_scale, weight_schedule)
        self.use_coop, self.use_nlrd = bool(use_coop), bool(use_nlrd)
        unknown = set(nlrd or {}) - set(NLRD_DEFAULTS)
        if unknown:
            raise ConfigError(f"method.nlrd has no option(s) {sorted(unknown)}; its options are {sorted(NLRD_DEFAULTS)}")
        opts = {**NLRD_DEFAULTS, **dict(nlrd or {})}
        if opts["gather"] not in ("all", "local"):
            raise ConfigError(f"method.nlrd.gather must be 'all' or 'local', got {opts['gather']!r}")
        self.nlrd_k, self.nlrd_weight, self.nlrd_gather = int(opts["k"]), float(opts["weight"]), opts["gather"]
        if self.use_nlrd and self.nlrd_k < 1:
            raise ConfigError(f"method.nlrd.k={self.nlrd_k}: NLRD needs at least 1 neighbour (k >= 1)")
        if self.use_coop:
            if context.prompt_embeds is None:
                raise ConfigError(
                    "method.use_coop=true needs learned text features: run `pand prompts ...` (stage 1) and pass "
                    "teacher.text_features=/path/to/learned_text_features.safetensors, or set method.use_coop=false"
                )
            if context.prompt_embeds.shape != context.text_embeds.shape:
                raise ConfigError(
                    f"learned text features have shape {tuple(context.prompt_embeds.shape)}, expected "
                    f"{tuple(context.text_embeds.shape)}"
                )
            self.register_buffer("prompt_embeds", context.prompt_embeds.detach().float().clone(), persistent=False)

    def class_text_embeds(self) -> torch.Tensor:
        return self.prompt_embeds if self.use_coop else self.text_embeds

    def training_losses(self, batch, teacher, progress: Progress) -> DistillerOutput:
        logits, teacher_logits, losses, logs = self.vl2lite_terms(batch, teacher, progress)
        if self.use_nlrd and self.nlrd_weight != 0.0:
            pool: dict[str, Any] = {}
            if self.nlrd_gather == "all" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                pool_s, pool_t, self_index = _gather_pool(logits.float(), teacher_logits)
                pool = {"pool_student": pool_s, "pool_teacher": pool_t, "self_index": self_index}
            losses["nlrd"] = self.nlrd_weight * nlrd_loss(logits, teacher_logits, self.nlrd_k, **pool)
        return DistillerOutput(logits, losses, logs)
