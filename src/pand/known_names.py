"""Names users bring from papers and other toolkits, answered with the pand overrides that mean the same.

Someone coming from mdistiller, the PAT or KDEOV code, or open_clip writes ``method=ls``, ``student=mobilenetv2`` or
``teacher=ViT-B/16``. Such a name is not a config of pand, but it has an exact equivalent; the error says which
overrides to write instead of listing every option. Names are compared without case, spaces, ``-``, ``_`` or ``/``,
so ``ViT-B/16``, ``vit_b16`` and ``VITB16`` are one name.

Model names that are not in this table but that torchvision, timm or open_clip know are answered too (``student=``
any torchvision or timm model, ``teacher=`` any open_clip model): those libraries are imported only on that error
path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Equivalent:
    """The overrides that give what a foreign name means, and why (a paper or toolkit, in a few words)."""

    overrides: tuple[str, ...]
    why: str


_LS = "Logit Standardization (Sun et al., CVPR 2024; mdistiller's LOGIT_STAND) is an option of kd, dkd and nrkd: " \
      "z-scored logits before the temperature"
_TAGS_SHOWN = 4
_KDEOV = "KDEOV's two losses (cosine distillation + label-aware InfoNCE); pand's default adds CLIP-KD's ICL"

def _aliases(equivalent: Equivalent, *names: str) -> dict[str, Equivalent]:
    """The same equivalent under each of ``names`` (normalised)."""
    return dict.fromkeys(names, equivalent)


_STAGE1 = ("`pand prompts` with the same overrides, then `pand train method=pand teacher.text_features=<the file it "
           "wrote>`")

#: group -> {normalised foreign name: its equivalent}
KNOWN: Mapping[str, Mapping[str, Equivalent]] = {
    "method": {
        **_aliases(Equivalent(("method=kd", "method.standardize=true"), _LS),
                   "ls", "lskd", "kdls", "logitstand", "logitstandardization"),
        **_aliases(Equivalent(("method=dkd", "method.standardize=true"), _LS), "dkdls", "lsdkd"),
        **_aliases(Equivalent(("method=ce",), "the student alone, on the labels (no teacher)"),
                   "vanilla", "baseline", "scratch", "crossentropy"),
        **_aliases(Equivalent(("method=kd",), "Hinton et al.'s knowledge distillation"), "hinton", "vanillakd"),
        **_aliases(Equivalent(("method=ofa",), "OFA-KD (Hao et al., NeurIPS 2023)"), "onefitsall", "ofakd"),
        "nsd": Equivalent(("method=pand",), "PAND's stage 2 (neighbourhood-structure distillation, with NLRD)"),
        "kdeov": Equivalent(("method=openvocab", "method.icl_weight=0"), _KDEOV),
        "clipkd": Equivalent(("method=openvocab",), "CLIP-KD's feature distillation and ICL, the method's defaults"),
        "tinyclip": Equivalent(("method=openvocab", "method.affinity_weight=1"),
                               "TinyCLIP's affinity mimicking, next to the default terms"),
        "openvocabulary": Equivalent(("method=openvocab",), "the open-vocabulary student"),
        "coop": Equivalent((), f"CoOp prompts are PAND's stage 1, a command of its own: {_STAGE1}"),
        "psc": Equivalent((), f"PAND's stage 1 (CoOp prompts) is a command of its own: {_STAGE1}"),
    },
    "student": {
        **_aliases(Equivalent(("student=mobilenet_v2",), "torchvision's MobileNetV2"), "mbv2", "mobilenet"),
        **_aliases(Equivalent(("student=resnet18",), "torchvision's ResNet-18"), "res18", "r18"),
        **_aliases(Equivalent(("student=cspdarknet",), "KDEOV's YOLO-style CSP-Darknet backbones (timm's)"),
                   "yolo", "darknet"),
    },
    "data": {
        **_aliases(Equivalent(("data=cub",), "CUB-200-2011"), "cub200", "cub2002011", "birds"),
        **_aliases(Equivalent(("data=aircraft",), "FGVC-Aircraft"), "fgvcaircraft", "aircrafts"),
        **_aliases(Equivalent(("data=pets",), "Oxford-IIIT Pet"), "oxfordpets", "oxfordiiitpet", "pet"),
        "stanforddogs": Equivalent(("data=dogs",), "Stanford Dogs"),
        "fmnist": Equivalent(("data=fashion_mnist",), "Fashion-MNIST"),
        "cifar": Equivalent(("data=cifar100",), "CIFAR-100"),
        **_aliases(Equivalent(("data=imagenet",), "ImageNet-1k (ILSVRC 2012)"), "imagenet1k", "ilsvrc2012"),
        "coco": Equivalent(("data=captions", "data.format=coco"), "image-caption pairs in COCO's layout"),
        "folder": Equivalent(("data=imagefolder",), "a folder of class folders"),
    },
    "teacher": {
        "convnextxxl": Equivalent(("teacher=convnext_xxlarge",), "open_clip ConvNeXt-XXLarge, VL2Lite's and PAND's"),
    },
}


def normalise(name: str) -> str:
    """``ViT-B/16`` -> ``vitb16``: the form names are compared in."""
    return re.sub(r"[\s_\-/.]+", "", name).lower()


def _library_equivalent(group: str, name: str, choices: list[str]) -> Equivalent | None:
    """An equivalent read from torchvision, timm or open_clip's own model lists (imported here, on an error path)."""
    if group == "student":
        import torchvision

        if name in torchvision.models.list_models(module=torchvision.models):
            return Equivalent(("student=resnet18", f"student.name={name}"),
                              f"torchvision's {name} (student.name takes any torchvision classification model)")
        import timm

        if timm.is_model(name):
            return Equivalent(("student=timm", f"student.name={name}"), f"timm's {name}")
    if group == "teacher":
        import open_clip

        models = {normalise(m): m for m in open_clip.list_models()}
        model = models.get(normalise(name))
        if model is not None:
            tags = open_clip.list_pretrained_tags_by_model(model)
            base = "vit_b16" if "vit_b16" in choices else choices[0]
            first = tags[0] if tags else "null"
            overrides = [f"teacher={base}", f"teacher.model={model}", f"teacher.pretrained={first}"]
            if tags and tags[0] == "openai":
                overrides.append("teacher.force_quick_gelu=true")  # OpenAI's weights were trained with QuickGELU
            more = len(tags) - _TAGS_SHOWN
            shown = ", ".join(tags[:_TAGS_SHOWN]) + (f" and {more} more" if more > 0 else "")
            return Equivalent(tuple(overrides), f"open_clip's {model}; its weights: {shown}" if tags else
                              f"open_clip's {model}, which has no published weights")
    return None


def equivalent(group: str, name: str, choices: list[str],
               library: Callable[[str, str, list[str]], Equivalent | None] = _library_equivalent) -> Equivalent | None:
    """What ``group=name`` means in pand when ``name`` is not one of ``choices`` (the group's configs), or None."""
    key = normalise(name)
    same = [c for c in choices if normalise(c) == key]
    if same:  # spelt differently: mobilenet-v2, ResNet18
        return Equivalent((f"{group}={same[0]}",), f"pand's name for {name}")
    known = KNOWN.get(group, {}).get(key)
    if known is not None:
        return known
    try:
        return library(group, name, choices)
    except ImportError:  # a library missing from a slim install: no answer, the list of options still follows
        return None


def explain(group: str, name: str, choices: list[str], line: str) -> str | None:
    """The one-line answer to ``group=name``, or None when pand knows no equivalent."""
    found = equivalent(group, name, choices)
    if found is None:
        return None
    if not found.overrides:
        return f"{line} is not a pand {group}; {found.why}"
    return f"{line} is not a pand {group} name; write {' '.join(found.overrides)}: {found.why}"
