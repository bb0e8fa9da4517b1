"""Real processes, real signals: SIGTERM / SIGINT stop a command with what it saved, the command that continues and
exit status 128 + the signal; a run or cache folder has one owner at a time."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pand.cli import main
from pand.locks import LOCK_FILE, FolderLock
from tests.engine.conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def _start(argv, marker: Path, *, slow_step: float = 0.0, slow_teacher: float = 0.0,
           hold: Path | None = None) -> subprocess.Popen:
    """``pand <argv>`` in a new Python whose training steps (or teacher passes) are slowed down, and which touches
    ``marker`` once it is at work (after its second step, or its first teacher pass); its teacher passes also wait
    while the file ``hold`` exists."""
    code = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from pand.engine.module import DistillationModule
        from pand.teachers.source import LiveTeacherSource
        marker = Path({str(marker)!r})
        step = DistillationModule.training_step
        def slow_step(self, batch, batch_idx):
            if self.global_step >= 2:
                marker.touch()
            time.sleep({slow_step})
            return step(self, batch, batch_idx)
        DistillationModule.training_step = slow_step
        forward = LiveTeacherSource.forward
        hold = Path({str(hold or "")!r}) if {bool(hold)!r} else None
        def slow_teacher(self, *args, **kwargs):
            marker.touch()
            while hold is not None and hold.exists():
                time.sleep(0.05)
            time.sleep({slow_teacher})
            return forward(self, *args, **kwargs)
        LiveTeacherSource.forward = slow_teacher
        from pand.cli import main
        sys.exit(main({list(argv)!r}))
    """)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    # its own process group, as a command started from a shell: a terminal's Ctrl-C reaches the whole group
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process ended (status {proc.returncode}) before it got to work:\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("the process did not get to work in time")
        time.sleep(0.1)


def _ce(cub_root, run, *extra):
    return ["train", *tiny_overrides(cub_root, run, "method=ce", "trainer.max_epochs=3", *extra)]


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("pand ")]


@pytest.mark.parametrize(("signum", "workers"), [(signal.SIGTERM, 0), (signal.SIGINT, 2)])
def test_a_signal_saves_the_step_names_the_resume_command_and_exits_128_plus_signal(cub_root, tmp_path, signum,
                                                                                     workers):
    """SIGTERM as a scheduler sends it (to the main process); SIGINT as a terminal's Ctrl-C sends it, to the whole
    process group, data-loader workers included."""
    run = tmp_path / "run"
    marker = tmp_path / "working"
    proc = _start(_ce(cub_root, run, f"data.num_workers={workers}"), marker, slow_step=0.3)
    _wait_for(marker, proc)
    if signum == signal.SIGINT:
        os.killpg(proc.pid, signum)
    else:
        proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert out == ""  # no summary on stdout: the run did not finish
    assert "Traceback" not in err
    line = _error_lines(err)[-1]
    last = run / "checkpoints" / "last.ckpt"
    assert line.startswith(f"pand train: interrupted by {signal.Signals(signum).name}; saved {last} (epoch ")
    resume = line.split("resume with: ", 1)[1]
    assert resume.endswith(f"ckpt_path={last}")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["last_checkpoint"] == str(last)
    saved = torch.load(last, map_location="cpu", weights_only=True)
    steps_done = saved["global_step"]
    assert steps_done >= 2

    # The printed command continues from that step: nothing trained twice, nothing skipped.
    import shlex

    argv = shlex.split(resume)
    assert argv[:2] == ["pand", "train"]
    assert main(argv[1:]) == 0
    straight = tmp_path / "straight"
    assert main(_ce(cub_root, straight)) == 0
    final = torch.load(last, map_location="cpu", weights_only=True)
    reference = torch.load(straight / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert final["global_step"] == reference["global_step"] > steps_done
    for key, value in reference["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), key
    assert json.loads((run / "summary.json").read_text())["status"] == "done"


def test_a_second_run_in_a_busy_run_folder_is_refused_with_the_owner(cub_root, tmp_path, capsys):
    run = tmp_path / "run"
    marker = tmp_path / "working"
    first = _start(_ce(cub_root, run), marker, slow_step=0.2)
    try:
        _wait_for(marker, first)
        assert main(_ce(cub_root, run, "seed=1")) == 2
        err = capsys.readouterr().err
        assert _error_lines(err) == [
            next(line for line in _error_lines(err) if f"is in use by pid {first.pid}" in line)]
        assert "started 20" in err and "choose another folder" in err
        # a resume of the same folder while it still trains is refused the same way
        assert main([*_ce(cub_root, run), f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}"]) == 2
        assert f"in use by pid {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM
    config = (run / "config.yaml").read_text()
    assert "seed: 0" in config  # the refused run wrote nothing into the folder


def test_a_killed_owner_leaves_no_stale_lock(tmp_path):
    folder = tmp_path / "run"
    code = (f"from pand.locks import FolderLock; import time; FolderLock({str(folder)!r}, 'run folder').acquire(); "
            "print('locked', flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert proc.stdout.readline().strip() == "locked"
    with pytest.raises(Exception, match=f"in use by pid {proc.pid}"):
        FolderLock(folder, "run folder").acquire()
    proc.kill()  # SIGKILL: no cleanup code runs
    proc.wait()
    assert (folder / LOCK_FILE).is_file()
    with FolderLock(folder, "run folder") as lock:
        assert lock.held and lock.owner()["pid"] == os.getpid()


def _cache_build(cub_root, tmp_path, cache):
    return ["cache", "build", *tiny_overrides(cub_root, tmp_path / "unused-run"), f"cache.dir={cache}",
            "cache.views=2", "cache.batch_size=2"]


def test_ctrl_c_during_a_cache_build_keeps_finished_chunks_in_one_line(cub_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    marker = tmp_path / "working"
    argv = _cache_build(cub_root, tmp_path, cache)
    proc = _start(argv, marker, slow_teacher=0.3)
    _wait_for(marker, proc)
    time.sleep(1.5)  # a few chunks
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = _error_lines(err)[-1]
    assert line.startswith("pand cache: interrupted by SIGINT; saved ")
    assert f"images of the teacher cache at {cache}" in line and "run it again to continue: pand cache build" in line
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache"] == str(cache)


def test_two_builds_of_one_cache_share_it_instead_of_corrupting_it(cub_root, tmp_path, capsys):
    cache = tmp_path / "cache"
    argv = _cache_build(cub_root, tmp_path, cache)
    hold = tmp_path / "hold"
    hold.touch()
    first = _start(argv, tmp_path / "first", hold=hold)
    _wait_for(tmp_path / "first", first)  # the first build is inside its first teacher pass, holding the folder
    second = _start(argv, tmp_path / "second")
    seen = []
    while not any("waiting for" in line for line in seen):
        line = second.stderr.readline()
        assert line, "the second build ended without waiting:\n" + "".join(seen)
        seen.append(line)
    hold.unlink()
    out1, err1 = first.communicate(timeout=240)
    out2, err2 = second.communicate(timeout=240)
    assert first.returncode == 0, err1
    assert second.returncode == 0, err2
    assert f"pid {first.pid}" in "".join(seen)
    assert not (tmp_path / "second").exists()  # the second build ran no teacher pass: every row was done
    assert json.loads(out1)["cache"] == json.loads(out2)["cache"] == str(cache)


@pytest.mark.parametrize("setting", ["run_dir", "cache.dir", "data.decoded_cache"])
def test_outputs_inside_the_dataset_folder_are_refused_before_anything_is_written(cub_root, tmp_path, capsys, setting):
    inside = cub_root / "images" / "pand-output"
    argv = ["train", *tiny_overrides(cub_root, tmp_path / "run", "method=kd", "test=false", "cache.views=2"),
            f"{setting}={inside}"]
    if setting != "cache.dir":
        argv = [a for a in argv if a != "cache.views=2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"pand train: error: {setting}={inside} is inside {cub_root.resolve()}, the folder of the "
                   f"train images; pand never writes into a dataset: choose a {setting} outside it")
    assert not inside.exists()
    assert not (tmp_path / "run").exists()  # the refused run leaves no run folder behind


def test_a_cache_build_inside_the_dataset_folder_is_refused(cub_root, tmp_path, capsys):
    inside = cub_root / "pand-cache"
    assert main(_cache_build(cub_root, tmp_path, inside)) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"pand cache: error: cache.dir={inside} is inside {cub_root.resolve()}, the folder of the train "
                   "images; pand never writes into a dataset: choose a cache.dir outside it")
    assert not inside.exists()
