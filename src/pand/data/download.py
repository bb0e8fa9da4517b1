"""Checked, atomic downloads and safe archive extraction, shared by every dataset.

``download_file`` streams a URL (``urllib``; ``file://`` works, which the tests use) to ``dest + ".part"`` with a
progress bar on stderr (tqdm, as torchvision shows), checks the md5 and renames the file into place, so an interrupted
download never leaves a file that looks complete. ``download_and_extract`` does that and then unpacks ``.tar``,
``.tgz``, ``.tar.gz`` (and other compressed tars), ``.zip`` or a single ``.gz`` under ``root``, refusing members that
would land outside ``root``.

Why not torchvision's ``download_url`` / ``download_and_extract_archive`` (torchvision 0.29), which pand's datasets
take their URLs and checksums from: they write straight to the final path, so an interrupted download leaves a
truncated file under the real name (for a source without md5, such as FGVC-Aircraft's, it is then taken as complete);
they open the URL without a timeout (a stalled connection hangs the run); after a failed https download they retry
over plain http; a checksum mismatch is reported as "File not found or corrupted." with neither checksum, and the bad
file is left in place; and their extraction (``tarfile.extractall`` without a filter, ``ZipFile.extractall``) does not
refuse members or links that leave the target folder. Downloading into a temporary folder and renaming would fix
only the first. So pand keeps its writer and extraction, and takes from the libraries what they add: the progress
bar (tqdm, which torchvision uses too).
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

from pand.errors import PandError

CHUNK = 1 << 20
TIMEOUT_S = 60

_TAR_SUFFIXES = (".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


def md5sum(path: str | os.PathLike) -> str:
    h = hashlib.md5(usedforsecurity=False)  # a checksum, not security: works on FIPS machines
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _progress(response, dest: Path):
    """A tqdm progress bar on stderr for ``response``, in bytes (the total from Content-Length when it is sent)."""
    from tqdm.auto import tqdm

    length = response.headers.get("Content-Length") if getattr(response, "headers", None) else None
    total = int(length) if length and str(length).isdigit() else None
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name, file=sys.stderr,
                dynamic_ncols=True)


def _offline_hint(url: str, dest: Path, layout: str | None) -> str:
    text = (
        f"If this machine cannot reach {url}, download it elsewhere and either place the file at {dest} "
        f"or place the extracted dataset under {dest.parent} in the expected layout"
    )
    return text + (f":\n{layout.rstrip()}" if layout else ".")


def download_file(url: str, dest: str | os.PathLike, md5: str | None, *, layout: str | None = None) -> Path:
    """Download ``url`` to ``dest`` atomically and verify its md5; return ``dest``.

    Nothing is fetched when ``dest`` already exists with the right md5 (or exists at all when ``md5`` is None, in
    which case the checksum is skipped: used for sources that publish none). A wrong checksum deletes the partial file
    and raises PandError naming the URL and both checksums; a network error raises PandError naming the URL and how to
    supply the data by hand (``layout``, if given, is shown).
    """
    dest = Path(dest)
    if dest.exists() and (md5 is None or md5sum(dest) == md5):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    h = hashlib.md5(usedforsecurity=False)  # a checksum, not security: works on FIPS machines
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as f, \
                _progress(response, dest) as bar:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except (OSError, http.client.HTTPException, ValueError) as e:
        part.unlink(missing_ok=True)
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        raise PandError(f"could not download {url}: {reason}. {_offline_hint(url, dest, layout)}") from e
    actual = h.hexdigest()
    if md5 is not None and actual != md5.lower():
        part.unlink(missing_ok=True)
        raise PandError(
            f"checksum mismatch for {url}: expected md5 {md5}, got {actual}; the partial download was deleted. "
            "Try again, or check that the URL still serves the original file."
        )
    os.replace(part, dest)
    return dest


def _default_filename(url: str) -> str:
    name = os.path.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not name:
        raise PandError(f"cannot derive a file name from {url}; pass filename=")
    return name


def _inside(root: Path, name: str) -> bool:
    target = (root / name).resolve()
    return target == root or root in target.parents


def _extract_tar(archive: Path, root: Path) -> None:
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            if os.path.isabs(m.name) or not _inside(root, m.name):
                raise PandError(f"refusing to extract {archive}: member {m.name!r} would land outside {root}")
            if (m.issym() or m.islnk()) and (
                os.path.isabs(m.linkname)
                or not _inside(root, os.path.join(os.path.dirname(m.name), m.linkname) if m.issym() else m.linkname)
            ):
                raise PandError(f"refusing to extract {archive}: link {m.name!r} -> {m.linkname!r} leaves {root}")
        try:
            tar.extractall(root, filter="data")
        except tarfile.FilterError as e:
            raise PandError(f"refusing to extract {archive}: {e}") from e


def _extract_zip(archive: Path, root: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if os.path.isabs(name) or name.startswith(("/", "\\")) or not _inside(root, name):
                raise PandError(f"refusing to extract {archive}: member {name!r} would land outside {root}")
        zf.extractall(root)


def _extract_gz(archive: Path, root: Path) -> None:
    out = root / archive.name[: -len(".gz")]
    part = out.with_name(out.name + ".part")
    with gzip.open(archive, "rb") as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    os.replace(part, out)


def extract_archive(archive: str | os.PathLike, root: str | os.PathLike) -> Path:
    """Unpack ``archive`` (tar family, zip or a single .gz) into ``root``; returns ``root``."""
    archive, root = Path(archive), Path(root)
    root.mkdir(parents=True, exist_ok=True)
    root = root.resolve()
    lower = archive.name.lower()
    try:
        if lower.endswith(_TAR_SUFFIXES):
            _extract_tar(archive, root)
        elif lower.endswith(".zip"):
            _extract_zip(archive, root)
        elif lower.endswith(".gz"):
            _extract_gz(archive, root)
        else:
            raise PandError(f"do not know how to extract {archive} (expected .tar, .tgz, .tar.gz, .zip or .gz)")
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, gzip.BadGzipFile) as e:
        raise PandError(f"cannot extract {archive}: {e}; delete it and download again") from e
    return root


def download_and_extract(
    url: str,
    root: str | os.PathLike,
    md5: str | None,
    filename: str | None = None,
    remove_archive: bool = False,
    *,
    layout: str | None = None,
) -> Path:
    """Download ``url`` to ``root/filename`` (see :func:`download_file`), extract it under ``root``; return ``root``.

    ``filename`` defaults to the last component of the URL path. With ``remove_archive`` the archive is deleted after
    a successful extraction.
    """
    root = Path(root).expanduser()
    archive = download_file(url, root / (filename or _default_filename(url)), md5, layout=layout)
    extract_archive(archive, root)
    if remove_archive:
        archive.unlink(missing_ok=True)
    return root
