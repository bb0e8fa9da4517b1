"""Provenance records for stored artefacts (teacher features, learned prompts, caches).

Every artefact pand derives from a teacher and a dataset stores a JSON record of what made it. Before reusing one,
the record is compared with what the current run would produce, and any difference is refused with its reason, so
that features of one teacher never silently feed a run with another teacher or class list.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save

from pand.errors import MismatchError, PandError
from pand.io import atomic_write_bytes
from pand.version import __version__

_META_KEY = "pand"


def describe_mismatch(stored: Mapping[str, Any], expected: Mapping[str, Any], keys=None) -> list[str]:
    """Human-readable differences between two records, restricted to ``keys`` if given."""
    keys = sorted(set(stored) | set(expected)) if keys is None else keys
    diffs = []
    for key in keys:
        a, b = stored.get(key), expected.get(key)
        if a != b:
            if isinstance(a, list) and isinstance(b, list) and len(a) != len(b):
                diffs.append(f"{key}: {len(a)} entries stored, {len(b)} expected")
            elif isinstance(a, list) and isinstance(b, list):
                first = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
                diffs.append(f"{key}[{first}]: stored {a[first]!r}, expected {b[first]!r}")
            else:
                diffs.append(f"{key}: stored {a!r}, expected {b!r}")
    return diffs


def check_provenance(
    path: str | Path, stored: Mapping[str, Any], expected: Mapping[str, Any], keys=None, hint: str = ""
) -> None:
    """Refuse (MismatchError) a stored artefact whose record differs from what this run expects, saying how."""
    diffs = describe_mismatch(stored, expected, keys)
    if diffs:
        message = f"{path} was made for something else and is refused:\n  " + "\n  ".join(diffs)
        raise MismatchError(message + (f"\n{hint}" if hint else ""))


def save_tensors(path: str | Path, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> Path:
    """Write tensors and their provenance record to one safetensors file, atomically."""
    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata={_META_KEY: json.dumps(record)})
    return atomic_write_bytes(path, data)


def load_record(path: str | Path) -> dict[str, Any]:
    """The provenance record of a file written by :func:`save_tensors`, without reading its tensors."""
    return _read(path, tensors=False)[1]


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and provenance record of a file written by :func:`save_tensors`."""
    return _read(path, tensors=True)


def _read(path: str | Path, tensors: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    path = Path(path)
    if not path.is_file():
        raise PandError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            found = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise PandError(f"{path} is not a readable safetensors file ({err}); rebuild it") from err
    if _META_KEY not in meta:
        raise MismatchError(f"{path} has no pand provenance record; it was not written by pand")
    return found, json.loads(meta[_META_KEY])


_VERSIONED = ("torch", "torchvision", "lightning", "open_clip_torch", "timm")


def software_record() -> dict[str, Any]:
    """The versions of pand and of the libraries that decide a run's numbers, and pand's git commit when pand runs
    from a git checkout (with ``dirty`` when tracked files differ from it), for a run's summary.json."""
    from importlib import metadata

    versions: dict[str, Any] = {"pand": __version__}
    for name in _VERSIONED:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {"versions": versions, "git": _git_commit(Path(__file__).resolve().parent)}


def _git_commit(folder: Path) -> dict[str, Any] | None:
    import subprocess

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None  # installed from a wheel, or git is not there
    return {"commit": commit, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}

