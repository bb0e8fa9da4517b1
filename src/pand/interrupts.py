"""What SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop, ``kill``) do to a pand command.

Both mean "stop, keeping what is cheap to keep", never "report success": the command raises
:class:`~pand.errors.Interrupted`, whatever was interrupted adds what it saved, and the CLI prints one line (what was
saved, how to resume) and exits with 128 + the signal number, the status shells and schedulers expect from a process a
signal stopped. Python's defaults do neither: SIGINT raises KeyboardInterrupt (Lightning turns it into exit status 1, a
cache build printed a traceback) and SIGTERM kills the process without a word (Lightning's own handler ends ``fit``
with a ``SystemExit`` whose code is ``None``: exit status 0).

Two ways of stopping:

* at once (:func:`stop_on_signals`): the handler raises where the process is. For work that keeps its results as it
  goes (a cache build marks each chunk done only once it is on disk; every file pand writes is replaced atomically),
  an exception at any point loses at most the piece in progress.
* at the next safe point (:class:`DeferredStop`): the handler only records the signal and the work loop asks
  :meth:`DeferredStop.pending` where stopping is clean (training: after an optimizer step, where a checkpoint resumes
  exactly). A second signal stops at once, so an impatient user or a scheduler's second notice is never ignored.

Handlers belong to the process that installed them: a data-loader worker forked from it ignores both signals (the
terminal sends Ctrl-C to the whole process group, a scheduler may signal every process), because its parent decides
when to stop and shuts the workers down.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from pand.errors import Interrupted

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exit_status(signum: int) -> int:
    """What a shell reports for a process a signal stopped (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


def _can_install() -> bool:
    # signal.signal() works only in the main thread of the main interpreter.
    return threading.current_thread() is threading.main_thread()


def _install(handler: Callable[[int, FrameType | None], Any]) -> dict[int, Any]:
    previous = {}
    for signum in STOP_SIGNALS:
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)
    return previous


def _restore(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`~pand.errors.Interrupted` where the process is, for the ``with`` block."""
    if not _can_install():
        yield
        return
    owner = os.getpid()

    def handler(signum: int, frame: FrameType | None) -> None:
        if os.getpid() == owner:  # a forked worker leaves stopping to its parent
            raise Interrupted(signum)

    previous = _install(handler)
    try:
        yield
    finally:
        _restore(previous)


class DeferredStop:
    """Records the first SIGINT / SIGTERM for the work loop to act on at its next safe point; a second raises."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self._previous: dict[int, Any] | None = None
        self._owner = os.getpid()

    def install(self) -> None:
        if self._previous is None and _can_install():
            self._owner = os.getpid()
            self._previous = _install(self._handle)

    def restore(self) -> None:
        if self._previous is not None:
            _restore(self._previous)
            self._previous = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._owner:
            return
        if self.pending is not None:
            raise Interrupted(signum)
        self.pending = signum


def ignore_stop_signals(*_: Any) -> None:
    """For a worker process: leave SIGINT and SIGTERM to the parent (usable as a DataLoader ``worker_init_fn``)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
