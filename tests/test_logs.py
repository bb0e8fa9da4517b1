"""The progress bars of pand's long loops: closed at once when the loop is left by an exception."""

import threading
import time

import pytest

from pand.logs import tracked


def _rich_threads(settle: float = 0.0):
    """rich's display refresh thread and track()'s own update thread; with ``settle``, those still alive after up to
    that many seconds (a stopped refresh thread ends after its current wait: rich sets its event, it does not join)."""
    deadline = time.monotonic() + settle
    while True:
        alive = [t for t in threading.enumerate() if t.is_alive() and type(t).__module__.startswith("rich.")]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def test_a_loop_left_by_an_exception_stops_its_progress_bar_at_once():
    before = _rich_threads()
    with pytest.raises(ValueError) as caught:  # the traceback keeps the loop's frames, and a bare track() alive
        with tracked(range(50), description="work") as steps:
            for i in steps:
                assert _rich_threads() != before  # the bar is running
                if i == 3:
                    raise ValueError("stop")
    assert caught.value.args == ("stop",)
    assert _rich_threads(settle=2.0) == before


def test_a_finished_or_disabled_loop_yields_every_item():
    with tracked(range(5), description="work") as steps:
        assert list(steps) == [0, 1, 2, 3, 4]
    with tracked(range(3), enabled=False, description="ignored") as steps:
        assert steps == range(3)
    assert _rich_threads(settle=2.0) == []
