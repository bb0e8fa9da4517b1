"""One owner per output folder: an exclusive lock that a second process is refused by, or waits on.

A run folder (``pand train``) and a teacher cache folder (``pand cache build``) are each written by one process at a
time. Without that, a second run started in the same ``run_dir`` wrote its config and checkpoints over the first one's
while both exited 0, and two cache builds could remove or rewrite rows the other was writing.

The lock is ``flock(2)`` on ``<folder>/.pand-lock``, held for the life of the work. The operating system releases it
when the process ends, however it ends (crash, ``kill -9``, power loss of the node), so a lock is never stale: a file
left behind by a dead process is simply locked again. The file also names its owner (pid, host, start time, command)
for the message a second process gets. It is never replaced, and deleted only with a folder that holds nothing else
(:func:`remove_if_unused`): a lock belongs to an inode, and a process holding the old inode would otherwise lock a
file nobody else sees. Waiting polls with a fresh open each time for the same reason.

``flock`` is reliable on local file systems and on NFSv4 / Lustre mounts that forward it; on a network file system
without lock support the lock may not exclude processes on other hosts (each host still excludes its own).
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import socket
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pand.errors import FolderInUseError
from pand.io import OUTPUT_MARKER

try:
    import fcntl
except ImportError:  # Windows: no flock; folders are not locked there
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger("pand")

LOCK_FILE = ".pand-lock"
#: Seconds between attempts while waiting for another process's lock.
POLL_SECONDS = 0.5


def _owner_record() -> dict[str, Any]:
    return {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join(["pand", *sys.argv[1:]] if Path(sys.argv[0]).name in ("pand", "__main__.py")
                              else sys.argv),
    }


def describe_owner(record: dict[str, Any] | None) -> str:
    if not record:
        return "another process (it has not written its name yet)"
    where = f" on {record['host']}" if record.get("host") and record["host"] != socket.gethostname() else ""
    text = f"pid {record.get('pid')}{where}, started {record.get('started')}"
    return text + (f": {record['command']}" if record.get("command") else "")


class FolderLock:
    """An exclusive lock on ``folder`` (created if missing) for ``what`` (\"run folder\", \"teacher cache\")."""

    def __init__(self, folder: str | os.PathLike, what: str) -> None:
        self.folder = Path(folder)
        self.what = what
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def owner(self) -> dict[str, Any] | None:
        """Who holds (or last held) the lock, from the file; None when it names nobody yet."""
        try:
            text = self.path.read_text(encoding="utf-8")
            record = json.loads(text)
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def _try(self) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        if fcntl is None:
            self._fd = fd
            return True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        # Written in place through the locked descriptor (see the module docstring: never replaced).
        data = (json.dumps(_owner_record()) + "\n").encode("utf-8")
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        self._fd = fd
        return True

    def acquire(self, *, wait: bool = False) -> FolderLock:
        """Take the lock; if another process holds it, raise :class:`FolderInUseError` naming that process, or with
        ``wait=True`` log who holds it and wait until it is released."""
        if self.held:
            return self
        if self._try():
            return self
        owner = describe_owner(self.owner())
        if not wait:
            raise FolderInUseError(
                f"{self.what} {self.folder} is in use by {owner}; wait for it to finish, or choose another folder")
        log.info("waiting for %s, which is writing the %s %s", owner, self.what, self.folder)
        while not self._try():
            time.sleep(POLL_SECONDS)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def remove_if_unused(folder: str | os.PathLike) -> None:
    """Remove ``folder`` if it holds nothing but pand's bookkeeping (its lock and output marker): what a run or build
    that created the folder and then failed before writing anything leaves behind. Call it after releasing the lock.
    """
    folder = Path(folder)
    try:
        if {p.name for p in folder.iterdir()} <= {LOCK_FILE, OUTPUT_MARKER}:
            for name in (OUTPUT_MARKER, LOCK_FILE):
                (folder / name).unlink(missing_ok=True)
            folder.rmdir()
    except OSError:
        pass
