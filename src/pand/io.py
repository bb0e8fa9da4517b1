"""Atomic file writes: a reader never sees half a file, and an interrupted write leaves the old file intact.

Every file pand writes goes to a temporary file in the destination folder, is flushed to disk, then renamed over the
real name (``os.replace`` is atomic within one file system). Writing next to the destination, never through
``$TMPDIR``, means a save needs free space only where the file lands and is never a cross-device copy.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from pand.errors import OutputError, PandError

_TMP_SUFFIX = ".tmp"

# OSError numbers that mean "this output location cannot take the file", worth one clear line instead of a traceback.
OUTPUT_ERRNOS = {
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.ENOTDIR: "a path component is a file, not a folder",
}


def fsync_dir(folder: Path) -> None:
    # The rename is durable only once the folder's entry is on disk; some file systems cannot fsync a folder.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class _WriteErrorRecorder:
    """A file object that remembers the OSError of a failed write.

    ``torch.save`` turns a failed write (a full disk) into ``RuntimeError: ... unexpected pos 704 vs 598``; keeping
    the OSError lets the caller report "no space left on the device" and the file instead.
    """

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._f.write(data)
        except OSError as err:
            self.error = err
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def atomic_write_with(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    """Call ``write(f)`` on a temporary file beside ``path``, fsync it, then rename it to ``path``.

    On any failure (including KeyboardInterrupt) the temporary file is removed and ``path`` keeps its old content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        # mkstemp creates the file private (0600); give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            recorder = _WriteErrorRecorder(f)
            try:
                write(recorder)  # type: ignore[arg-type]
            except Exception as err:
                if recorder.error is None or recorder.error is err:
                    raise
                raise recorder.error from err
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(err, OSError) and err.filename is None and err.errno is not None:
            # A failed write on an open file names no file; the message should name the one being written.
            raise OSError(err.errno, err.strerror or str(err), str(path)) from err
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    return atomic_write_with(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def leftover_temp_files(folder: str | os.PathLike, name: str) -> list[Path]:
    """Temporary files of :func:`atomic_write_with` for ``name`` left behind by a process that was killed."""
    folder = Path(folder)
    return sorted(folder.glob(f".{name}.*{_TMP_SUFFIX}")) if folder.is_dir() else []


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """Make sure files can be created in ``folder`` (or, if it does not exist yet, can be created under its nearest
    existing parent), by creating and removing a probe file. Raises :class:`OutputError` naming ``what``.

    A real write is the only reliable test: ``os.access`` says yes to root on a read-only mount.
    """
    folder = Path(folder).expanduser().absolute()
    probe_dir = folder
    while not probe_dir.exists():
        if probe_dir.parent == probe_dir:
            break
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise OutputError(f"{what} {folder} cannot be created: {probe_dir} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe_dir, prefix=".pand-write-probe.", suffix=_TMP_SUFFIX)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        reason = OUTPUT_ERRNOS.get(err.errno, err.strerror or str(err))
        where = "" if probe_dir == folder else f" (it would be created under {probe_dir})"
        raise OutputError(f"{what} {folder} is not writable{where}: {reason}") from err
    return folder


def _hash_file(path: str | os.PathLike, h) -> str:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digest(path: str | os.PathLike, digest_size: int = 16) -> str:
    """blake2b of a file's content (hex), read in 1 MB blocks: names a weights file or a cache array by what it
    holds, so that a file rewritten in place under the same name is told apart."""
    return _hash_file(path, hashlib.blake2b(digest_size=digest_size))


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content (hex), the digest users check a shipped file with (``sha256sum``)."""
    return _hash_file(path, hashlib.sha256())


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    """Parse a JSON file; a damaged one is a :class:`~pand.errors.PandError` naming it, not a decoder traceback."""

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PandError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise PandError(f"{what} {path} is not valid JSON (not UTF-8 text at byte {err.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        state = "empty" if not text.strip() else f"not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        raise PandError(f"{what} {path} is {state}; it is damaged or was cut short") from None


# -------------------------------------------------------------------------------------------- pand's output folders
#: A file pand leaves in every folder it writes as a whole (run folders, caches, feature and export folders), so that
#: a directory walk over input images can tell pand's own outputs from the user's data and never read them as inputs.
OUTPUT_MARKER = ".pand-output"


def mark_output_folder(folder: str | os.PathLike, kind: str) -> None:
    """Record that ``folder`` is a pand output of ``kind`` (``run``, ``teacher-cache``, ``decoded-images``, ...)."""
    folder = Path(folder)
    marker = folder / OUTPUT_MARKER
    if not marker.exists():
        atomic_write_text(marker, f"{kind}\n")


def is_output_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds the :data:`OUTPUT_MARKER` of a pand output."""
    return (Path(folder) / OUTPUT_MARKER).is_file()
