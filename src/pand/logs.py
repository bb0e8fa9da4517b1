"""How pand's processes log (set up once in the command line and in each worker of :mod:`pand.jobs`), and the
progress bars of its long loops."""

from __future__ import annotations

import logging
import re
import sys
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a line is logged, not the stream that was current at set-up."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


class _DropLightningTips(logging.Filter):
    """Lightning's advertisements for its cloud products (``💡 Tip: ... litlogger`` / ``litmodels``); its other lines
    (GPU / TPU available, ...) pass."""

    _TIP = re.compile(r"^\s*💡 Tip:.*\b(litlogger|litmodels|LitLogger|LitModelCheckpoint)\b", re.DOTALL)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self._TIP.match(str(record.msg))


#: The loggers through which Lightning's ``rank_zero_info`` lines go (the lightning package and the standalone ones).
_LIGHTNING_RANK_ZERO_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "pytorch_lightning.utilities.rank_zero",
    "lightning_fabric.utilities.rank_zero",
)

#: Deprecation warnings that libraries emit about their own use of torch internals; nothing a pand user can act on.
#: Matched by the start of the message, each for its category only.
_KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    # torch >= 2.9 when Lightning flattens a batch (lightning/pytorch/utilities/_pytree.py builds LeafSpec())
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
)


def setup_logging() -> None:
    """How every pand process logs: pand's INFO lines as ``pand: ...`` on stderr, libraries' warnings once (the
    root handler), Lightning's console lines once (its own handler) and without its product tips."""
    # Warnings from libraries once, through the root handler; pand's INFO lines through their own handler.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setLevel(logging.WARNING)
    pand_log = logging.getLogger("pand")
    if not pand_log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("pand: %(message)s"))
        pand_log.addHandler(handler)
    pand_log.setLevel(logging.INFO)
    pand_log.propagate = False
    # `import lightning` gives the "lightning" logger its own console handler ("INFO: GPU available: ..."); without
    # this, its warnings would also propagate to the root handler and be printed twice.
    logging.getLogger("lightning").propagate = False
    # huggingface_hub installs its own handler too (its retry lines were printed twice when a download failed).
    logging.getLogger("huggingface_hub").propagate = False
    for name in _LIGHTNING_RANK_ZERO_LOGGERS:
        log = logging.getLogger(name)
        if not any(isinstance(f, _DropLightningTips) for f in log.filters):
            log.addFilter(_DropLightningTips())
    for message, category in _KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


@contextmanager
def tracked(iterable: Iterable, enabled: bool = True, **options: Any) -> Iterator[Iterable]:
    """``iterable`` with rich's progress bar (``options``: those of ``rich.progress.track``), closed when the block
    ends, however it ends.

    A loop left by an exception abandons rich's ``track`` generator with its display and refresh threads still
    running; the garbage collector later finishes it in whatever thread it runs in, possibly the refresh thread of a
    later progress bar, which then waits for itself: a process that caught the error and went on (a build resumed in
    the same process) hung. Closing the generator here stops both at once, in this thread.
    """
    if not enabled:
        yield iterable
        return
    from rich.progress import track

    steps = track(iterable, **options)
    try:
        yield steps
    finally:
        steps.close()
