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


def test_with_two_workers_the_weight_left_is_shared_between_them(monkeypatch):
    clock = iter([0.0, 120.0, 130.0])
    monkeypatch.setattr(jobs.time, "time", lambda: next(clock))
    lines = []
    todo = [Job(name, _square, (1,), weight=w) for name, w in (("h1", 4.0), ("h2", 4.0), ("l1", 1.0), ("l2", 1.0),
                                                                ("l3", 1.0))]
    progress = Progress(todo, printer=lines.append, workers=2)
    progress.finished(todo[0], 120.0)  # 30 s a unit on one worker; 7 units left on 2 workers: 105 s
    progress.finished(todo[1], 130.0)  # 250 s for 8 units; 3 units left on 2 workers: about 47 s
    assert lines == ["[1/5] h1: 120 s; elapsed 2:00, about 1:45 left", "[2/5] h2: 130 s; elapsed 2:10, about 0:47 left"]


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


def _log_twice(x):
    import logging

    import lightning.pytorch  # noqa: F401 - gives Lightning's loggers their own console handler, as in a real run

    logging.getLogger("pand").info("pand line %s", x)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").info("GPU available: no")
    return x


def test_a_workers_log_has_each_line_once(tmp_path):
    run_jobs([Job("a", _log_twice, (1,), log=tmp_path / "a.log"), Job("b", _log_twice, (2,), log=tmp_path / "b.log")],
             2, cores=2)
    text = (tmp_path / "a.log").read_text()
    assert text.count("pand line 1") == 1 and "pand: pand line 1" in text
    assert text.count("GPU available: no") == 1


def _visible_gpu(i):
    import time

    time.sleep(0.2)  # long enough that both workers take jobs
    return os.environ.get("CUDA_VISIBLE_DEVICES"), os.getpid()


def test_each_worker_sees_only_its_own_gpu(tmp_path):
    done = run_jobs([Job(f"j{i}", _visible_gpu, (i,)) for i in range(4)], 2, cores=2, gpus=["3", "5"])
    seen = {}
    for d in done:
        gpu, pid = d.result
        seen.setdefault(pid, set()).add(gpu)
    assert all(len(gpus) == 1 for gpus in seen.values())  # a worker keeps its GPU for every job it runs
    assert set().union(*seen.values()) <= {"3", "5"} and len(set().union(*seen.values())) == len(seen)
    with pytest.raises(PandError, match="2 runs side by side need a GPU each; 1 given"):
        run_jobs([Job("a", _square, (1,))], 2, gpus=["0"])


def test_a_failed_job_stops_the_run_naming_the_job_and_its_log(tmp_path):
    todo = [Job("fine", _square, (1,), log=tmp_path / "fine.log"), Job("broken", _fail, (7,), log=tmp_path / "b.log")]
    with pytest.raises(PandError, match=r"broken failed: ValueError: bad 7; its output: .*b\.log"):
        run_jobs(todo, 2, cores=2)
    assert "about to fail" in (tmp_path / "b.log").read_text()


def test_default_workers_and_time_format():
    assert default_workers(9, cores=2) == 2 and default_workers(1, cores=16) == 1 and default_workers(20, cores=64) == 4
    assert format_seconds(0) == "0:00" and format_seconds(61.4) == "1:01" and format_seconds(3600) == "60:00"
