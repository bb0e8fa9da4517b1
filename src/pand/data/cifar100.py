"""CIFAR-100: 100 fine classes, 50,000 official train / 10,000 test RGB 32x32 images, held in memory.

Official files (the extracted ``cifar-100-python.tar.gz``, torchvision's layout): ``cifar-100-python/train``,
``cifar-100-python/test`` and ``cifar-100-python/meta``, Python pickles of dicts. ``train`` and ``test`` hold ``data``
(uint8 ``[N, 3072]``; one image per row in channel-planar order: 1024 red, then 1024 green, then 1024 blue values,
each plane a row-major 32x32 image), ``fine_labels`` (N ints) and ``filenames``; ``meta`` holds ``fine_label_names``
(the class names in label order). The original files were written by Python 2 and are read with
``encoding="latin1"``, as torchvision does; keys may be str or bytes.

Unpickling can run arbitrary code, so pand never reads these files with plain :mod:`pickle`: :class:`SafeUnpickler`
only rebuilds numpy arrays (the three globals :data:`ALLOWED_GLOBALS` name) besides the plain lists, dicts, strings
and numbers a pickle builds without any import, and refuses every other global before anything is called.

Images are stored channels-last (``[N, 32, 32, 3]`` RGB) in an :class:`~pand.data.base.ArrayDataset`. Class names are
the fine label names with underscores turned into spaces. There is no official validation split (``val`` is carved
from train).
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pand.data import base
from pand.data.download import download_and_extract
from pand.data.registry import register_dataset
from pand.errors import PandError

TITLE = "CIFAR-100"
FOLDER = "cifar-100-python"
HAS_OFFICIAL_VAL = False
MARKERS = ("meta", "train", "test")
FILES = {"train": "train", "test": "test"}
META = "meta"

IMAGE_SIZE = 32
ROW_BYTES = 3 * IMAGE_SIZE * IMAGE_SIZE  # 3072

# Where download=True fetches the data. ``None`` is filled on first use from torchvision's ``CIFAR100.url``,
# ``CIFAR100.tgz_md5`` and ``CIFAR100.filename`` (imported lazily). Tests monkeypatch the entry with a file:// archive.
SOURCES: dict[str, dict | None] = {"archive": None}

LAYOUT = """\
  <root>/cifar-100-python/        (or pass the cifar-100-python folder itself as root)
    train                         pickled dict: data uint8 [50000, 3072] (R, G, B planes of 32x32), fine_labels
    test                          pickled dict: the same for the 10,000 test images
    meta                          pickled dict: fine_label_names (the 100 class names in label order)
  (the extracted cifar-100-python.tar.gz, the layout torchvision's CIFAR100(root, download=True) writes)"""

# The only globals a CIFAR-100 pickle needs: numpy's array reconstruction (module ``numpy.core.multiarray`` in the
# Python 2 originals and numpy < 2, ``numpy._core.multiarray`` in files re-pickled by numpy >= 2).
ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)

_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
_CACHE_MAX = 4


class SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts, strings and numbers, and refuses every other object.

    Every global a pickle references goes through :meth:`find_class`; anything outside :data:`ALLOWED_GLOBALS` raises
    a PandError naming ``path`` before it is imported or called.
    """

    def __init__(self, file: Any, path: str | os.PathLike) -> None:
        super().__init__(file, encoding="latin1")
        self.path = Path(path)

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_GLOBALS:
            if name == "_reconstruct":
                return _reconstruct()
            return np.ndarray if name == "ndarray" else np.dtype
        what = f"{module}.{name}"
        if len(what) > 100:
            what = what[:97] + "..."
        raise PandError(
            f"{self.path} holds objects other than arrays and lists ({what!r}); refused. pand unpickles only numpy "
            "arrays, lists, strings and numbers from CIFAR-100 files; replace it with the file from the official "
            "cifar-100-python.tar.gz"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise PandError(f"{self.path} holds objects other than arrays and lists (a persistent id); refused")


def _reconstruct() -> Any:
    try:
        from numpy._core.multiarray import _reconstruct as fn  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy < 2
        from numpy.core.multiarray import _reconstruct as fn
    return fn


def safe_load(path: str | os.PathLike) -> Any:
    """Unpickle ``path`` with :class:`SafeUnpickler`.

    Raises:
        PandError: the file references a global other than numpy's array reconstruction ("refused"), or it is
            not a readable pickle (corrupt, truncated); the message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise PandError(f"cannot read {TITLE} file {path}: {e}") from e
    try:
        return SafeUnpickler(io.BytesIO(data), path).load()
    except PandError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, UnicodeDecodeError, MemoryError, RecursionError) as e:  # fmt: skip
        raise PandError(
            f"cannot read {TITLE} file {path}: not a valid pickle ({type(e).__name__}: {e}); the file is corrupt or "
            "truncated: extract the official cifar-100-python.tar.gz again"
        ) from e


def sources() -> dict[str, dict]:
    if SOURCES.get("archive") is None:
        from torchvision.datasets import CIFAR100

        SOURCES["archive"] = {"url": CIFAR100.url, "md5": CIFAR100.tgz_md5, "filename": CIFAR100.filename}
    return SOURCES  # type: ignore[return-value]


def download(root: str | os.PathLike) -> None:
    src = sources()["archive"]
    download_and_extract(src["url"], Path(root).expanduser(), src["md5"], src.get("filename"), layout=LAYOUT)


def _as_dict(obj: Any, path: Path, kind: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` as a dict with str keys (bytes keys decoded) holding ``keys``; else a PandError naming ``path``."""
    if not isinstance(obj, dict):
        raise PandError(f"{path} is not a CIFAR-100 {kind} file: it holds a {type(obj).__name__}, not a dict")
    out = {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}
    for key in keys:
        if key not in out:
            found = ", ".join(repr(k) for k in out) or "none"
            raise PandError(f"{path} is not a CIFAR-100 {kind} file: no {key!r} entry (keys: {found})")
    return out


def read_class_names(path: Path) -> list[str]:
    """The cleaned ``fine_label_names`` of ``meta`` in label order (any number of them; each listed once)."""
    meta = _as_dict(safe_load(path), path, "meta", ("fine_label_names",))
    raw = meta["fine_label_names"]
    if not isinstance(raw, (list, tuple)) or not raw or not all(isinstance(n, (str, bytes)) for n in raw):
        raise PandError(f"{path}: 'fine_label_names' must be a non-empty list of strings")
    names = [base.clean_name(n.decode("latin1") if isinstance(n, bytes) else n) for n in raw]
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        # Two labels with one name would train two classes that CLIP prompts cannot tell apart.
        j = first.setdefault(name.casefold(), i)
        if j != i:
            raise PandError(
                f"{path}: fine label {i} is named {name!r} like fine label {j}; every class needs its own name"
            )
    return names


def read_split(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``[N, 32, 32, 3]`` RGB, fine labels int64 ``[N]``) of a ``train`` or ``test`` file.

    The planar rows of ``data`` (R plane, G plane, B plane) become channels-last images. Results are read-only and
    cached per file (path, size, modification time).
    """
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    d = _as_dict(safe_load(path), path, "data", ("data", "fine_labels"))
    data, labels = d["data"], d["fine_labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != ROW_BYTES:
        got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise PandError(f"{path}: 'data' must be a uint8 array [N, {ROW_BYTES}] (32x32 RGB, channel-planar), got {got}")
    labels = np.asarray(labels) if isinstance(labels, (list, tuple, np.ndarray)) else None
    if labels is None or labels.ndim != 1 or (labels.size and not np.issubdtype(labels.dtype, np.integer)):
        raise PandError(f"{path}: 'fine_labels' must be a list of integers")
    if len(labels) != len(data):
        raise PandError(f"{path} has {len(data)} images but {len(labels)} fine_labels")
    images = np.ascontiguousarray(data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1))
    labels = labels.astype(np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = (images, labels)
    return images, labels


@register_dataset("cifar100")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.ArrayDataset:
    """The official ``"train"`` (50k) or ``"test"`` (10k) split."""
    base.check_split(split, ("train", "test"))
    d = base.dataset_dir(__name__, root, download)
    meta = base.require(d / META, TITLE, LAYOUT, download=True)
    split_file = base.require(d / FILES[split], TITLE, LAYOUT, download=True)
    classes = read_class_names(meta)
    images, labels = read_split(split_file)
    n = len(classes)
    base.check_label_range(labels, n, split_file, "fine label", f"{meta} lists {n} fine label names")
    ids = [f"{split}/{i}" for i in range(len(images))]
    return base.ArrayDataset("cifar100", split, classes, images, labels.tolist(), ids, root=d)
