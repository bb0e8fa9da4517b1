"""Datasets: official splits of CUB-200-2011, FGVC-Aircraft, Oxford-IIIT Pet, Stanford Dogs, Fashion-MNIST and any
image-folder dataset, as :class:`ClassificationDataset` objects built by :func:`get_dataset`."""

from pand.data.base import ClassificationDataset, subset
from pand.data.splits import DATASET_NAMES, get_dataset, stratified_split

__all__ = ["ClassificationDataset", "DATASET_NAMES", "get_dataset", "stratified_split", "subset"]
