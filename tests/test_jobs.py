"""Independent runs side by side: order, progress and time left, output per job, and a failure named."""

import os

import pytest

from pand import jobs
from pand.errors import PandError
from pand.jobs import Job, Progress, default_workers, format_seconds, run_jobs


def _square(x):
    print(f"squaring {x}")
    return x * x, os.getpid()


def _fail(x):
    print("about to fail")
    raise ValueError(f"bad {x}")


def test_progress_estimates_the_time_left_from_the_finished_jobs_pace(monkeypatch):
    clock = iter([100.0, 130.0, 190.0])
    monkeypatch.setattr(jobs.time, "time", lambda: next(clock))
    lines = []
    todo = [Job("a", _square, (1,), weight=1.0), Job("b", _square, (2,), weight=2.0), Job("c", _square, (3,), weight=1.0)]
    progress = Progress(todo, printer=lines.append)  # starts at 100
    progress.finished(todo[0], 30.0, "fine")  # 30 s for 1 of 4 units: 90 s left
    progress.finished(todo[1], 60.0)  # 90 s for 3 of 4: 30 s left
    assert lines == ["[1/3] a: fine, 30 s; elapsed 0:30, about 1:30 left", "[2/3] b: 60 s; elapsed 1:30, about 0:30 left"]


def test_in_process_jobs_keep_their_order_and_print_one_line_each(capsys):
    done = run_jobs([Job("three", _square, (3,)), Job("two", _square, (2,), weight=5)], 1,
                    describe=lambda job, r: f"= {r[0]}")
    assert [d.result[0] for d in done] == [9, 4] and all(d.result[1] == os.getpid() for d in done)
    out = capsys.readouterr().out
    assert "squaring 3" in out and "[1/2] three: = 9" in out and "[2/2] two: = 4" in out


def test_jobs_side_by_side_run_in_other_processes_with_their_output_in_their_logs(tmp_path, capsys):
    todo = [Job(f"job {i}", _square, (i,), weight=i, log=tmp_path / f"{i}.log") for i in (2, 3, 4)]
    done = run_jobs(todo, 2, cores=2)
    assert [d.job.name for d in done] == ["job 2", "job 3", "job 4"]  # the order given, whatever finished first
    assert [d.result[0] for d in done] == [4, 9, 16] and os.getpid() not in {d.result[1] for d in done}
    assert all((tmp_path / f"{i}.log").read_text() == f"squaring {i}\n" for i in (2, 3, 4))
    assert "squaring" not in capsys.readouterr().out


def test_a_failed_job_stops_the_run_naming_the_job_and_its_log(tmp_path):
    todo = [Job("fine", _square, (1,), log=tmp_path / "fine.log"), Job("broken", _fail, (7,), log=tmp_path / "b.log")]
    with pytest.raises(PandError, match=r"broken failed: ValueError: bad 7; its output: .*b\.log"):
        run_jobs(todo, 2, cores=2)
    assert "about to fail" in (tmp_path / "b.log").read_text()


def test_default_workers_and_time_format():
    assert default_workers(9, cores=2) == 2 and default_workers(1, cores=16) == 1 and default_workers(20, cores=64) == 4
    assert format_seconds(0) == "0:00" and format_seconds(61.4) == "1:01" and format_seconds(3600) == "60:00"
