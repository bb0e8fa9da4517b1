"""Datasets: official splits of CUB-200-2011, FGVC-Aircraft, Oxford-IIIT Pet, Stanford Dogs, Fashion-MNIST,
CIFAR-100, ImageNet and any image-folder dataset, as :class:`ClassificationDataset` objects built by
:func:`get_dataset`; :func:`verify_splits` decodes every image once before training."""

from pand.data.base import ClassificationDataset, restrict_classes, subset
from pand.data.splits import DATASET_NAMES, base_novel_classes, get_dataset, stratified_split
from pand.data.verify import verify_images, verify_splits

__all__ = [
    "base_novel_classes",
    "DATASET_NAMES",
    "ClassificationDataset",
    "get_dataset",
    "stratified_split",
    "restrict_classes",
    "subset",
    "verify_images",
    "verify_splits",
]
