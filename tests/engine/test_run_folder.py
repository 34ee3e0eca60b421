"""Run-folder lock (across processes, release on exceptions and on kill -9), the new-run check, and
atomic_save's permissions and atomicity."""
from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

from fastmice.core.checkpoint import atomic_save
from fastmice.engine import run_folder
from fastmice.engine.run_folder import LOCK_NAME, RunFolderBusy, RunFolderExists, RunFolderLock, check_new_run, lock_holder
from tests.helpers import REPO

MODULE_DIR = str(REPO)

HOLD = textwrap.dedent("""
    import sys, time
    from fastmice.engine.run_folder import RunFolderLock
    lock = RunFolderLock(sys.argv[1]).__enter__()
    print("locked", lock.mechanism, flush=True)
    time.sleep(120)
""")

TRY = textwrap.dedent("""
    import sys
    from fastmice.engine.run_folder import RunFolderBusy, RunFolderLock
    try:
        with RunFolderLock(sys.argv[1]):
            print("acquired")
    except RunFolderBusy as e:
        print("busy:", e)
        sys.exit(3)
""")


def python(code: str, *args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": MODULE_DIR + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


@pytest.fixture
def holder(tmp_path):
    """A child process holding the lock on tmp_path/run; killed with SIGKILL at the end if still alive."""
    run = tmp_path / "run"
    proc = python(HOLD, str(run))
    line = proc.stdout.readline()
    assert line.startswith("locked flock"), (line, proc.stderr.read() if proc.poll() is not None else "")
    yield run, proc
    if proc.poll() is None:
        proc.kill()
    proc.communicate(timeout=10)                       # reaps it and closes the pipes


def test_second_writer_in_another_process_is_refused_with_the_holders_details(holder):
    run, proc = holder
    with pytest.raises(RunFolderBusy) as info:
        with RunFolderLock(run):
            pytest.fail("entered a held lock")
    msg = str(info.value)
    assert str(run) in msg
    assert f"pid {proc.pid} on host {socket.gethostname()}" in msg
    assert "--run-dir" in msg and "Wait" in msg
    assert info.value.holder["pid"] == proc.pid and info.value.run_dir == run
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_holder_in_this_process_refuses_a_child_then_lets_it_in(tmp_path):
    run = tmp_path / "run"
    with RunFolderLock(run) as lock:
        assert lock.held and lock.mechanism == "flock"
        assert lock_holder(run)["pid"] == os.getpid()
        child = python(TRY, str(run))
        out, err = child.communicate(timeout=60)
        assert child.returncode == 3, (out, err)
        assert out.startswith("busy: run folder") and f"pid {os.getpid()}" in out
    assert not lock.held and lock_holder(run) == {}          # released and emptied
    child = python(TRY, str(run))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0 and out.strip() == "acquired", (out, err)


def test_kill_9_of_the_holder_leaves_a_stale_file_that_does_not_block(holder):
    run, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    assert json.loads((run / LOCK_NAME).read_text())["pid"] == proc.pid   # the stale details are still there
    with RunFolderLock(run) as lock:
        assert lock.held and lock_holder(run)["pid"] == os.getpid()


def test_released_on_exception_and_a_second_lock_in_one_process_is_refused(tmp_path):
    run = tmp_path / "run"
    with pytest.raises(ZeroDivisionError):
        with RunFolderLock(run):
            with pytest.raises(RunFolderBusy):   # flock: two open files conflict even within one process
                RunFolderLock(run).__enter__()
            1 / 0
    with RunFolderLock(run) as again:            # free again
        assert again.held
    again.release()                              # idempotent


def test_lock_creates_the_folder_and_refuses_a_file(tmp_path):
    with RunFolderLock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / LOCK_NAME).is_file()
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        RunFolderLock(tmp_path / "f").__enter__()


def test_without_fcntl_the_run_goes_ahead_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(run_folder, "fcntl", None)
    with pytest.warns(RuntimeWarning, match="is not locked"):
        with RunFolderLock(tmp_path / "run") as lock:
            assert lock.held and lock.mechanism is None


NO_FLOCK = """
import errno, fcntl
def no_flock(fd, op):
    raise OSError(errno.ENOSYS, "Function not implemented")
fcntl.flock = no_flock
"""


def test_unsupported_flock_falls_back_to_lockf(tmp_path, monkeypatch):
    """A file system without flock (Lustre without -o flock): POSIX locks keep two processes apart."""
    import errno

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(run_folder.fcntl, "flock", no_flock)   # this process too
    run = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("error")                  # no "not locked" warning: lockf worked
        with RunFolderLock(run) as lock:
            assert lock.mechanism == "lockf"
            child = python(NO_FLOCK + TRY, str(run))
            out, err = child.communicate(timeout=60)
            assert child.returncode == 3 and "busy: run folder" in out, (out, err)
    child = python(NO_FLOCK + TRY, str(run))
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, (out, err)


def test_check_new_run_accepts_missing_empty_and_unrelated(tmp_path):
    check_new_run(tmp_path / "missing")
    check_new_run(tmp_path)
    (tmp_path / "config.yaml").write_text("name: x\n")
    (tmp_path / LOCK_NAME).write_text("")
    check_new_run(tmp_path)


def test_check_new_run_refuses_a_finished_run(tmp_path):
    for name in ("checkpoint.pt", "eval.json", "metrics.jsonl"):
        (tmp_path / name).write_text("x")
    with pytest.raises(RunFolderExists) as info:
        check_new_run(tmp_path)
    msg = str(info.value)
    assert f"fastmice train --resume {tmp_path}" in msg and "--run-dir" in msg
    assert "finished, evaluated run" in msg and "checkpoint.pt, eval.json, metrics.jsonl" in msg
    assert info.value.found == ["checkpoint.pt", "eval.json", "metrics.jsonl"]
    assert isinstance(info.value, ValueError)


def test_check_new_run_interrupted_and_checkpointless(tmp_path):
    (tmp_path / "checkpoint.pt").write_text("x")
    with pytest.raises(RunFolderExists, match=r"finished or interrupted\): checkpoint.pt\. .*--resume"):
        check_new_run(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    (other / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunFolderExists, match="nothing to resume") as info:
        check_new_run(other)
    assert "--resume" not in str(info.value)
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        check_new_run(tmp_path / "file")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_save_mode_follows_the_umask(tmp_path, umask022):
    path = tmp_path / "run" / "checkpoint.pt"
    atomic_save({"w": torch.arange(3)}, path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert torch.equal(torch.load(path)["w"], torch.arange(3))
    os.umask(0o027)
    atomic_save({"w": torch.arange(4)}, path)                  # a replacement gets the mode afresh
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert sorted(p.name for p in path.parent.iterdir()) == ["checkpoint.pt"]


def test_old_mkstemp_save_gave_0600(tmp_path, umask022):
    """The bug: fastmice.checkpoint.atomic_save as of d7a9124 (mkstemp) leaves 0600."""
    import tempfile
    fd, tmp = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    assert stat.S_IMODE(os.stat(tmp).st_mode) == 0o600


@pytest.mark.parametrize("failure", [lambda: None, KeyboardInterrupt])
def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "checkpoint.pt"
    atomic_save({"epoch": 1}, path)
    before = path.read_bytes()
    real_save = torch.save

    def broken_save(obj, fh, *a, **kw):
        fh.write(b"partial bytes")                           # some of the new file is written, then it fails
        if isinstance(failure, type):
            raise failure()
        real_save(failure, fh)                               # a lambda: torch.save raises (cannot pickle)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises((KeyboardInterrupt, Exception)):
        atomic_save({"epoch": 2}, path)
    assert path.read_bytes() == before
    assert torch.load(path) == {"epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]   # no temporary left behind
