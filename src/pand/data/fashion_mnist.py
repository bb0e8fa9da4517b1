"""Fashion-MNIST: 10 classes, 60,000 official train / 10,000 test greyscale 28x28 images, held in memory.

Official files: the four IDX files ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``
and ``t10k-labels-idx1-ubyte``, each optionally gzipped (``.gz``). They are searched in ``root``,
``root/FashionMNIST/raw`` (torchvision's layout), ``root/fashion-mnist`` and finally :data:`SYSTEM_DIR`, where Debian's
``dataset-fashion-mnist`` package installs them. IDX is parsed here with numpy (big-endian header, magic 2051 for
images, 2049 for labels). ``load_image`` returns the grey image converted to RGB. ``val`` is carved from train.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np

from pand.data import base
from pand.data.download import download_file
from pand.data.registry import register_dataset
from pand.errors import PandError

TITLE = "Fashion-MNIST"
FOLDER = "FashionMNIST/raw"
HAS_OFFICIAL_VAL = False

# Last place searched; a module constant so tests can monkeypatch it.
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049

# Where download=True fetches the four .gz files (into root/FashionMNIST/raw). ``None`` entries are filled on first
# use from torchvision's ``FashionMNIST.mirrors`` (first mirror) and ``FashionMNIST.resources`` (file name, md5),
# imported lazily. Tests monkeypatch the entries with file:// URLs.
SOURCES: dict[str, dict | None] = {f"{name}.gz": None for pair in FILES.values() for name in pair}

LAYOUT = """\
  <root>/                         (or <root>/FashionMNIST/raw/, <root>/fashion-mnist/)
    train-images-idx3-ubyte[.gz]
    train-labels-idx1-ubyte[.gz]
    t10k-images-idx3-ubyte[.gz]
    t10k-labels-idx1-ubyte[.gz]
  (Debian/Ubuntu: `apt install dataset-fashion-mnist` puts them in /usr/share/datasets/fashion-mnist/)"""

_CACHE: dict[tuple, np.ndarray] = {}
_CACHE_MAX = 4


def sources() -> dict[str, dict]:
    if any(v is None for v in SOURCES.values()):
        from torchvision.datasets import FashionMNIST

        mirror = FashionMNIST.mirrors[0]
        for filename, md5 in FashionMNIST.resources:
            if SOURCES.get(filename) is None:
                SOURCES[filename] = {"url": mirror.rstrip("/") + "/" + filename, "md5": md5, "filename": filename}
    return SOURCES  # type: ignore[return-value]


def download(root: str | os.PathLike) -> None:
    dest = Path(root).expanduser() / FOLDER
    for key, src in sources().items():
        download_file(src["url"], dest / src.get("filename", key), src["md5"], layout=LAYOUT)


def search_dirs(root: str | os.PathLike) -> list[Path]:
    root = Path(root).expanduser()
    return [root, root / "FashionMNIST" / "raw", root / "fashion-mnist", Path(SYSTEM_DIR)]


def _find(d: Path, name: str) -> Path | None:
    for cand in (d / name, d / f"{name}.gz"):
        if cand.is_file():
            return cand
    return None


def find_files(root: str | os.PathLike, split: str) -> tuple[Path, Path] | None:
    """(images, labels) IDX files of ``split`` from the first search dir holding both, or None."""
    for d in search_dirs(root):
        found = [_find(d, name) for name in FILES[split]]
        if all(found):
            return found[0], found[1]  # type: ignore[return-value]
    return None


def read_idx(path: str | os.PathLike, magic: int) -> np.ndarray:
    """Parse an (optionally gzipped) IDX file of unsigned bytes with the given magic number."""
    path = Path(path)
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key in _CACHE:
        return _CACHE[key]
    try:
        with gzip.open(path, "rb") if path.name.endswith(".gz") else open(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PandError(f"cannot read IDX file {path}: {e}") from e
    ndim = magic & 0xFF
    header = 4 * (1 + ndim)
    if len(data) < header:
        raise PandError(f"{path} is not an IDX file: only {len(data)} bytes")
    got = int.from_bytes(data[:4], "big")
    if got != magic:
        raise PandError(f"{path}: IDX magic number {got}, expected {magic}")
    shape = tuple(int(x) for x in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(shape))
    if len(data) - header != expected:
        raise PandError(f"{path}: header says shape {shape} ({expected} bytes) but holds {len(data) - header} bytes")
    arr = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)
    arr.setflags(write=False)
    if len(_CACHE) >= _CACHE_MAX:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[key] = arr
    return arr


def locate(root: str | os.PathLike, split: str, download_missing: bool = False) -> tuple[Path, Path]:
    """(images, labels) files of ``split``; downloads them first if missing and asked to; else DatasetNotFoundError."""
    found = find_files(root, split)
    if found is None and download_missing:
        download(root)
        found = find_files(root, split)
    if found is None:
        dirs = ", ".join(str(d) for d in search_dirs(root))
        raise base.not_found(
            f"{TITLE} {split} files not found (searched {dirs})",
            Path(root) / FILES[split][0],
            TITLE,
            LAYOUT,
            download=True,
        )
    return found


@register_dataset("fashion_mnist")
def load(root: str | os.PathLike, split: str, *, download: bool = False) -> base.ArrayDataset:
    """The official ``"train"`` (60k) or ``"test"`` (10k, the t10k files) split."""
    base.check_split(split, ("train", "test"))
    images_path, labels_path = locate(root, split, download)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    if len(images) != len(labels):
        raise PandError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    base.check_label_range(labels, len(CLASSES), labels_path, "label", f"Fashion-MNIST has {len(CLASSES)} classes")
    ids = [f"{split}/{i}" for i in range(len(images))]
    return base.ArrayDataset("fashion_mnist", split, CLASSES, images, labels.tolist(), ids, root=images_path.parent)
