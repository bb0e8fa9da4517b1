"""Datasets: official splits of CUB-200-2011, FGVC-Aircraft, Oxford-IIIT Pet, Stanford Dogs, Fashion-MNIST,
CIFAR-100, ImageNet, any image-folder dataset, image-caption pairs (:mod:`pand.data.captions`) and WebDataset tar
shards (:mod:`pand.data.shards`), as
:class:`ClassificationDataset` objects built by :func:`get_dataset`; :func:`verify_splits` decodes every image once
before training. Importing this package registers every built-in dataset (:mod:`pand.data.registry`);
:mod:`pand.data.assembly` puts a run's splits together."""

from pand.data.base import ClassificationDataset, restrict_classes, subset
from pand.data.registry import DatasetModule, get_dataset_kind, list_datasets, register_dataset
from pand.data.splits import base_novel_classes, get_dataset, stratified_split
from pand.data.verify import verify_images, verify_splits

# Registration side effects: each module registers its dataset; this order is the order names are listed in messages.
from pand.data import cub, aircraft, pets, dogs, fashion_mnist, cifar100, imagenet, imagefolder  # noqa: F401,I001
from pand.data import captions, shards  # noqa: F401,I001

DATASET_NAMES = list_datasets()

__all__ = [
    "base_novel_classes",
    "DATASET_NAMES",
    "ClassificationDataset",
    "DatasetModule",
    "get_dataset",
    "get_dataset_kind",
    "list_datasets",
    "register_dataset",
    "stratified_split",
    "restrict_classes",
    "subset",
    "verify_images",
    "verify_splits",
]
