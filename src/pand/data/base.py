"""The dataset type every pand dataset returns, plus the helpers the per-dataset loaders share.

A :class:`ClassificationDataset` is an indexable list of ``(image, label)`` pairs with a cleaned, label-ordered class
list and a content :meth:`~ClassificationDataset.fingerprint`. Two concrete kinds exist: :class:`FileDataset` (images
on disk, addressed by a path relative to the dataset folder) and :class:`ArrayDataset` (greyscale or RGB images held in
a uint8 array, e.g. Fashion-MNIST, CIFAR-100). :func:`subset` restricts any of them to some indices without copying
the images.

Constructing a dataset never opens an image; images are decoded in :meth:`~ClassificationDataset.load_image`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.utils.data
from PIL import Image, UnidentifiedImageError

from pand.errors import ConfigError, CorruptImageError, DatasetNotFoundError, PandError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

DOWNLOAD_HINT = "pass download=True (config: data.download=true) to download it"


class ClassificationDataset(torch.utils.data.Dataset):
    """An image-classification split: ``dataset[i] -> (image, label)``.

    Attributes:
        name: dataset name (``"cub"``, ``"aircraft"``, ...).
        split: ``"train"``, ``"val"`` or ``"test"``.
        classes: human-readable class names in label order.
        targets: the 0-based label of every item.
        transform: callable applied to the RGB PIL image in ``__getitem__`` (``None``: return the PIL image).
        root: the dataset folder the items live in (for messages; not part of the fingerprint).
    """

    name: str
    split: str
    classes: list[str]
    targets: list[int]
    transform: Callable[[Image.Image], Any] | None
    root: Path | None

    def __init__(
        self,
        name: str,
        split: str,
        classes: Sequence[str],
        targets: Iterable[int],
        transform: Callable[[Image.Image], Any] | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.classes = list(classes)
        self.targets = [int(t) for t in targets]
        self.transform = transform
        self.root = Path(root) if root is not None else None
        self._fingerprint: str | None = None
        n = len(self.classes)
        bad = [t for t in self.targets if not (0 <= t < n or t == -1)]  # -1: an unlabelled training image
        if bad:
            raise PandError(f"{name}/{split}: label {bad[0]} is outside 0..{n - 1} ({n} classes) in {self.root}")

    # -- to implement ---------------------------------------------------------------------------------------------
    def load_image(self, i: int) -> Image.Image:
        """The ``i``-th image as an RGB PIL image."""
        raise NotImplementedError

    def sample_id(self, i: int) -> str:
        """A stable identifier of the ``i``-th sample (relative path, or ``"<official split>/<index>"``)."""
        raise NotImplementedError

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        """Feed the identity of the items ``indices`` (path + size + label, or raw bytes + label) into ``h``."""
        raise NotImplementedError

    # -- shared ---------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        image = self.load_image(i)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[i]

    def fingerprint(self) -> str:
        """sha256 hex over name, split, classes and every item's identity; computed once, then cached."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            header = {"name": self.name, "split": self.split, "classes": self.classes, "n": len(self)}
            h.update(json.dumps(header, sort_keys=True, ensure_ascii=False).encode("utf-8"))
            self._hash_items(h, range(len(self)))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def _check_index(self, i: int) -> int:
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for {self.name}/{self.split} with {n} items")
        return i

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={len(self.classes)}, root={str(self.root) if self.root else None!r})"
        )


#: What PIL raises on data it cannot decode (a truncated JPEG, a file of another type, a decompression bomb).
DECODE_ERRORS = (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError, SyntaxError)


def open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` as an 8-bit RGB PIL image, the one way pand reads every image file (see :func:`to_rgb`).

    Training, the decoded-image cache, verification, ``pand predict`` and unlabelled folders all come through here,
    so a file gives the same pixels wherever pand reads it. EXIF orientation is not applied (as before: applying it
    now would change the inputs of existing runs and caches).

    Raises:
        DatasetNotFoundError: the file does not exist.
        CorruptImageError: the file exists but cannot be decoded.
    """
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError as e:
        raise DatasetNotFoundError(f"image file not found: {path}") from e
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot decode image {path}: {e}") from e


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """:func:`open_rgb` for an image held in memory (a member of a tar shard); ``name`` says where it comes from.

    Raises:
        CorruptImageError: the bytes cannot be decoded; the message names ``name``.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return to_rgb(im)
    except DECODE_ERRORS as e:
        raise CorruptImageError(f"cannot decode image {name}: {decode_reason(e)}") from e


def decode_reason(error: BaseException) -> str:
    """PIL's message for ``error`` without the in-memory file it names (``<_io.BytesIO object at 0x...>``), which
    says nothing and differs at every run."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(error)).strip() or type(error).__name__


def user_cache_dir() -> Path | None:
    """``$PAND_CACHE_DIR``, else ``~/.cache/pand``: where pand remembers what it learnt about the user's data (images
    verified, content digests, tar shard indices). None when there is no home folder to put it in."""
    try:
        return Path(os.environ.get("PAND_CACHE_DIR") or "~/.cache/pand").expanduser()
    except RuntimeError:  # no $HOME and no passwd entry
        return None


#: PIL modes of 16-bit greyscale data (16-bit PNG and TIFF greyscale, in either byte order).
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """``image`` (any PIL mode) as 8-bit RGB, scaled by its bit depth rather than clipped.

    PIL's own ``convert("RGB")`` clips every value above 255 of a high-bit-depth image to white, so two different
    16-bit scans both become a white square. Here:

    * 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``) keeps the high byte (``v >> 8``). That is what PIL
      itself does when it loads a 16-bit RGB, RGBA or grey+alpha PNG (it hands them over as 8-bit RGB / RGBA), so a
      scan stored as 16-bit grey and the same scan stored as 16-bit RGB decode to the same pixels. The scale is the
      bit depth, never the image's own range: a 16-bit file whose values all lie in 0..255 decodes to black, and
      12-bit data in a 16-bit container decodes dark, as any viewer that honours the depth shows them.
    * ``I`` (32-bit integer) is taken to hold 16-bit data, which is how PIL represents 16-bit PGM/PPM greyscale (it
      rescales a PGM of any maxval to 0..65535) and 16-bit PNG greyscale in older Pillow versions; values outside
      0..65535 are clipped, then ``v >> 8``.
    * ``F`` (32-bit float, e.g. a float TIFF) is taken to hold intensities in 0..1, the convention of float images in
      scikit-image, OpenCV and torchvision; ``round(v * 255)`` after clipping to 0..1, NaN as 0.
    * Every 8-bit mode goes through PIL's ``convert("RGB")`` as before, so the pixels of existing datasets, caches
      and runs do not change: alpha (``RGBA``, ``LA``, ``PA``, a palette's transparent entry) is dropped, not
      composited, leaving the colour stored under it; ``P`` maps through its palette; ``1`` gives 0 / 255; ``CMYK``
      (JPEG CMYK, Adobe's inverted CMYK included, which PIL un-inverts while decoding) uses PIL's ICC-less formula
      ``(255 - C) * (255 - K) / 255``; ``L`` and ``YCbCr`` use PIL's conversions.
    """
    mode = image.mode
    if mode in _UINT16_MODES or mode == "I":
        values = np.asarray(image)
        if mode == "I":
            values = np.clip(values, 0, 65535)
        grey = (values.astype(np.uint16) >> 8).astype(np.uint8)
    elif mode == "F":
        values = np.nan_to_num(np.asarray(image, dtype=np.float32), nan=0.0)
        grey = np.rint(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        return image.convert("RGB")
    return Image.fromarray(np.ascontiguousarray(grey)).convert("RGB")


class FileDataset(ClassificationDataset):
    """Images stored as files under ``root``; ``relpaths[i]`` is the i-th file relative to ``root`` (POSIX style)."""

    def __init__(
        self,
        name: str,
        split: str,
        classes: Sequence[str],
        root: str | os.PathLike,
        relpaths: Sequence[str],
        targets: Sequence[int],
        transform: Callable[[Image.Image], Any] | None = None,
    ) -> None:
        if len(relpaths) != len(targets):
            raise ValueError(f"{len(relpaths)} paths but {len(targets)} targets")
        super().__init__(name, split, classes, targets, transform, root)
        self.relpaths = list(relpaths)

    def path(self, i: int) -> Path:
        """Absolute path of the i-th image."""
        return self.root / self.relpaths[self._check_index(i)]

    def load_image(self, i: int) -> Image.Image:
        return open_rgb(self.path(i))

    def sample_id(self, i: int) -> str:
        return self.relpaths[self._check_index(i)]

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        root = self.root
        for i in indices:
            rel = self.relpaths[i]
            try:
                size = os.stat(root / rel).st_size
            except FileNotFoundError as e:
                raise DatasetNotFoundError(f"image file not found: {root / rel}") from e
            h.update(f"{rel}\0{size}\0{self.targets[i]}\n".encode("utf-8", "surrogateescape"))


class ArrayDataset(ClassificationDataset):
    """uint8 images held in memory; ``ids[i]`` is the sample id of item i.

    ``images`` is greyscale ``(N, H, W)`` (e.g. Fashion-MNIST), or ``(N, H, W, C)`` channels-last with ``C`` 1
    (greyscale) or 3 (RGB, e.g. CIFAR-100). ``load_image`` always returns an RGB PIL image.
    """

    def __init__(
        self,
        name: str,
        split: str,
        classes: Sequence[str],
        images: np.ndarray,
        targets: Sequence[int],
        ids: Sequence[str] | None = None,
        transform: Callable[[Image.Image], Any] | None = None,
        root: str | os.PathLike | None = None,
    ) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8 or not (images.ndim == 3 or (images.ndim == 4 and images.shape[3] in (1, 3))):
            raise ValueError(
                f"images must be a uint8 array (N, H, W) or (N, H, W, C) with C 1 or 3, "
                f"got {images.dtype} {images.shape}"
            )
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        super().__init__(name, split, classes, targets, transform, root)
        self.images = images
        self.ids = list(ids) if ids is not None else [f"{split}/{i}" for i in range(len(images))]

    def load_image(self, i: int) -> Image.Image:
        arr = np.ascontiguousarray(self.images[self._check_index(i)])
        if arr.ndim == 3 and arr.shape[2] == 3:
            return Image.fromarray(arr)  # uint8 (H, W, 3): RGB
        if arr.ndim == 3:  # (H, W, 1)
            arr = arr[:, :, 0]
        return Image.fromarray(arr, mode="L").convert("RGB")

    def sample_id(self, i: int) -> str:
        return self.ids[self._check_index(i)]

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        idx = np.asarray(list(indices), dtype=np.int64)
        h.update(str(self.images.shape[1:]).encode())
        h.update(np.ascontiguousarray(self.images[idx]).tobytes())
        h.update(np.asarray(self.targets, dtype="<i8")[idx].tobytes())


class SubsetDataset(ClassificationDataset):
    """A view of ``parent`` restricted to ``indices`` (the images are not copied)."""

    def __init__(self, parent: ClassificationDataset, indices: Sequence[int], split: str | None = None,
                 classes: Sequence[int] | None = None) -> None:
        n = len(parent)
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"subset index {bad[0]} out of range for {parent.name}/{parent.split} with {n} items")
        # ``classes``: parent labels kept, in their new label order (every item must have one of them).
        relabel = {c: i for i, c in enumerate(classes)} if classes is not None else None
        super().__init__(
            parent.name,
            split or parent.split,
            parent.classes if relabel is None else [parent.classes[c] for c in classes],
            [parent.targets[i] if relabel is None else relabel[parent.targets[i]] for i in idx],
            parent.transform,
            parent.root,
        )
        self.parent = parent
        self.indices = idx

    def load_image(self, i: int) -> Image.Image:
        return self.parent.load_image(self.indices[self._check_index(i)])

    def sample_id(self, i: int) -> str:
        return self.parent.sample_id(self.indices[self._check_index(i)])

    def _hash_items(self, h: Any, indices: Sequence[int]) -> None:
        self.parent._hash_items(h, [self.indices[i] for i in indices])


def restrict_classes(dataset: ClassificationDataset, classes: Sequence[int], *, split: str | None = None
                     ) -> ClassificationDataset:
    """The items of ``dataset`` whose label is in ``classes``, relabelled ``0..len(classes)-1`` in that order."""
    keep = set(int(c) for c in classes)
    indices = [i for i, y in enumerate(dataset.targets) if y in keep]
    return SubsetDataset(dataset, indices, split=split, classes=[int(c) for c in classes])


def subset(
    dataset: ClassificationDataset, indices: Iterable[int], *, split: str | None = None
) -> ClassificationDataset:
    """``dataset`` restricted to ``indices`` (in the given order): same name, split, classes and transform.

    ``targets``, ``load_image``, ``sample_id`` and ``fingerprint`` refer to the selected items only. ``split``
    overrides the split name (used to turn a part of the official training split into ``"val"``).
    """
    if hasattr(indices, "tolist"):
        indices = indices.tolist()
    return SubsetDataset(dataset, list(indices), split=split)


# ---------------------------------------------------------------------------------------------------------------------
# helpers shared by the loaders
# ---------------------------------------------------------------------------------------------------------------------


def clean_name(raw: str, *, strip_prefix: str | None = None) -> str:
    """Underscores to spaces, whitespace collapsed; ``strip_prefix`` is a regex removed from the start first."""
    if strip_prefix:
        raw = re.sub(strip_prefix, "", raw, count=1)
    return " ".join(raw.replace("_", " ").split())


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def layout_message(title: str, layout: str, *, download: bool) -> str:
    """The expected-layout block appended to every "not found" error."""
    text = f"Expected layout of {title}:\n{layout.rstrip()}"
    if download:
        text += (
            f"\nTo fetch it automatically, {DOWNLOAD_HINT}; the official archives are downloaded and extracted into "
            "the root you gave when the dataset folder is absent there."
        )
    else:
        text += "\nThere is no automatic download for this dataset; create the folders above yourself."
    return text


def not_found(what: str, path: str | os.PathLike, title: str, layout: str, *, download: bool) -> DatasetNotFoundError:
    """A DatasetNotFoundError naming the missing ``path`` and showing the expected layout."""
    return DatasetNotFoundError(f"{what}: missing {path}\n{layout_message(title, layout, download=download)}")


def find_dataset_dir(root: str | os.PathLike, folder: str, markers: Sequence[str]) -> Path | None:
    """``root/folder`` or ``root`` itself, whichever contains one of ``markers`` (tried in that order); else None."""
    root = Path(root).expanduser()
    for cand in (root / folder, root):
        if any((cand / m).exists() for m in markers):
            return cand
    return None


def locate_dataset(
    root: str | os.PathLike,
    folder: str,
    markers: Sequence[str],
    title: str,
    layout: str,
    download_fn: Callable[[str | os.PathLike], None],
    download_missing: bool = False,
) -> Path:
    """The dataset folder under ``root``; downloads it first if it is missing and ``download_missing``."""
    found = find_dataset_dir(root, folder, markers)
    if found is None and download_missing:
        download_fn(root)
        found = find_dataset_dir(root, folder, markers)
    if found is None:
        raise not_found(f"{title} not found under {root}", Path(root) / folder, title, layout, download=True)
    return found


def dataset_dir(module_name: str, root: str | os.PathLike, download_missing: bool = False) -> Path:
    """:func:`locate_dataset` for the dataset module ``module_name`` (pass ``__name__``), with its ``FOLDER``,
    ``MARKERS``, ``TITLE``, ``LAYOUT`` and ``download`` (see :class:`pand.data.registry.DatasetModule`).

    They are read from the module at each call, not bound once, so a test that monkeypatches them is obeyed.
    """
    m = sys.modules[module_name]
    return locate_dataset(root, m.FOLDER, m.MARKERS, m.TITLE, m.LAYOUT, m.download, download_missing)


def check_label_range(labels: np.ndarray, n: int, path: Path, what: str, known: str) -> None:
    """Every label of an array-stored dataset lies in ``0..n-1``; else an error naming ``path``, the index of the first
    bad label and how many more follow. ``what`` names a label (``"label"``), ``known`` says where ``n`` comes from."""
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        i = int(bad[0])
        k = bad.size - 1
        more = f"; {k} more label{'s are' if k > 1 else ' is'} out of range after it" if k else ""
        raise PandError(f"{path}: {what} {int(labels[i])} at index {i} is outside 0..{n - 1} ({known}){more}")


def require(path: Path, title: str, layout: str, *, download: bool) -> Path:
    """Return ``path`` if it exists, else raise the layout-bearing DatasetNotFoundError."""
    if not path.exists():
        raise not_found(f"{title} is incomplete", path, title, layout, download=download)
    return path


def read_lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-empty, non-comment lines of a text file."""
    out = []
    with open(path, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            line = line.strip()
            if line and not line.startswith("#"):
                out.append((no, line))
    return out


def malformed(path: Path, no: int, line: str, expected: str) -> PandError:
    return PandError(f"malformed line {no} in {path}: {line!r} (expected {expected})")


def check_files_exist(dataset_dir: Path, relpaths: Sequence[str], listing: Path | str, title: str) -> None:
    """Raise naming the first image that ``listing`` references but that does not exist, or that resolves (through a
    link or ``..``) to a file outside ``dataset_dir``: a dataset's images are the files inside its folder."""
    missing = [p for p in relpaths if not os.path.exists(os.path.join(dataset_dir, p))]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetNotFoundError(
            f"{title}: {listing} references a missing image: {dataset_dir / missing[0]}{more}. "
            "The image folder is incomplete; re-extract the dataset archive."
        )
    outside = files_outside(dataset_dir, relpaths)
    if outside:
        rel, real = outside[0]
        more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
        raise PandError(
            f"{title}: {listing} lists {dataset_dir / rel}, which resolves to {real}, outside the dataset folder "
            f"{dataset_dir}{more}; pand reads a dataset's images from inside its folder only: copy the files in "
            "instead of linking to them"
        )


def files_outside(dataset_dir: str | os.PathLike, relpaths: Sequence[str]) -> list[tuple[str, str]]:
    """(relative path, real path) of the files of ``relpaths`` whose real path lies outside ``dataset_dir``."""
    root = os.path.realpath(dataset_dir)
    prefix = root.rstrip(os.sep) + os.sep
    real_dirs: dict[str, str] = {}  # a listing holds thousands of files in a few folders: resolve each folder once
    out = []
    for rel in relpaths:
        path = os.path.join(dataset_dir, rel)
        parent, name = os.path.split(path)
        real_parent = real_dirs.get(parent)
        if real_parent is None:
            real_parent = real_dirs[parent] = os.path.realpath(parent)
        real = os.path.join(real_parent, name)
        if os.path.islink(real):
            real = os.path.realpath(real)
        if not real.startswith(prefix):
            out.append((rel, real))
    return out


def check_split(split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise ConfigError(f"unknown split {split!r}; valid splits: {', '.join(valid)}")
