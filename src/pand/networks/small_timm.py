"""Small ViT and MLP-Mixer configurations for 32-px images, registered as timm models.

timm's ViT and Mixer entry points are built for 224 px with 16-px patches: at 32 px that leaves a 2 x 2 patch grid,
and the Mixer entry points fix the patch size, depth and width, so ``student.kwargs`` cannot change them. The 32-px
heterogeneous comparisons (CNN / ViT / MLP students on CIFAR or Fashion-MNIST) need the small-patch versions the KD
literature trains there, so pand registers them in timm's registry under ``pand_*`` names; they are then ordinary
timm models for every part of pand (students, classifier teachers, stage discovery through ``feature_info``):

* ``pand_vit_p4_32``: ViT with 4-px patches (an 8 x 8 grid plus a class token), width 192, depth 6, 3 heads.
* ``pand_mixer_p4_32``: MLP-Mixer with 4-px patches (64 tokens), width 128, 8 blocks.

Both keep every argument overridable (``student.kwargs``), e.g. ``{depth: 4, embed_dim: 96}``. No pretrained weights.
"""

from __future__ import annotations

from typing import Any

from timm.models import register_model
from timm.models.mlp_mixer import MlpMixer
from timm.models.vision_transformer import VisionTransformer

from pand.errors import WeightsUnavailableError

# Keys timm's create_model adds for its own weight loading; these models have no weights to load.
_FACTORY_KEYS = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir")


def _model_args(name: str, pretrained: bool, defaults: dict[str, Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    if pretrained:
        raise WeightsUnavailableError(f"{name} has no pretrained weights; use pretrained=false")
    return {**defaults, **{k: v for k, v in kwargs.items() if k not in _FACTORY_KEYS}}


@register_model
def pand_vit_p4_32(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    defaults = {"img_size": 32, "patch_size": 4, "embed_dim": 192, "depth": 6, "num_heads": 3}
    return VisionTransformer(**_model_args("pand_vit_p4_32", pretrained, defaults, kwargs))


@register_model
def pand_mixer_p4_32(pretrained: bool = False, **kwargs: Any) -> MlpMixer:
    defaults = {"img_size": 32, "patch_size": 4, "embed_dim": 128, "num_blocks": 8}
    return MlpMixer(**_model_args("pand_mixer_p4_32", pretrained, defaults, kwargs))
