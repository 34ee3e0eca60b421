"""Run-folder protection: one writer at a time, no new run over an old one, checkpoints others can read.

* :class:`RunFolderLock`: an exclusive lock on ``RUN/.lock`` held by the process that writes the run folder
  (training, then the evaluation at its end). A second writer gets :class:`RunFolderBusy` naming the folder
  and the holder (pid, host, start time). The lock is ``flock(LOCK_EX | LOCK_NB)`` on an open file: the kernel
  drops it when the holder's file is closed, which includes the holder dying in any way (``kill -9``, OOM,
  power loss of a client on NFS once its lease expires), so a stale ``.lock`` file never blocks anybody; the
  file itself is never deleted (deleting a lock file lets two processes lock two different files).
* :func:`check_new_run`: a NEW run (not ``--resume``) into a folder that already holds a run's files
  (``checkpoint.pt``, ``eval.json``, ``metrics.jsonl``, ``assignments.csv``) is refused with
  :class:`RunFolderExists`, which says what is there and what to do.

File systems: on a local disk flock is exact. On NFS, Linux (>= 2.6.12) implements flock with NFS byte-range
locks, so it works across machines with NFSv4, or NFSv3 with the lock manager running; a mount with
``nolock`` or ``local_lock=flock/all`` makes the lock local to each machine (two hosts are then not kept
apart). Lustre needs the ``flock`` mount option (else flock fails with ENOSYS), and some FUSE file systems
have no locks. Where flock fails for such a reason, ``fcntl.lockf`` (POSIX record locks) is tried; where
neither works, and where the ``fcntl`` module does not exist (Windows), the run goes ahead unlocked with a
``RuntimeWarning`` saying so (``RunFolderLock.mechanism`` is then None).

Processes that inherit the lock's descriptor through ``fork`` without ``exec`` (e.g. fork-started data
workers) share the lock: it is released when the last of them exits. The descriptor is close-on-exec, so
programs started with ``subprocess`` do not hold it.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from fastmice.core.checkpoint import CHECKPOINT_NAME, atomic_save, stale_temporaries

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["LOCK_NAME", "RUN_FILES", "RunFolderBusy", "RunFolderExists", "RunFolderLock", "atomic_save",
           "check_new_run", "lock_holder"]

LOCK_NAME = ".lock"
# The files that mark a folder as holding a run (written by training and evaluation); config.yaml alone does
# not (it is written before the first step, and a run that died there left nothing to keep).
RUN_FILES = (CHECKPOINT_NAME, "eval.json", "metrics.jsonl", "assignments.csv")
# flock errors that mean "this file system has no such locks", as opposed to "somebody holds it".
_UNSUPPORTED = {errno.ENOSYS, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL, getattr(errno, "ENOTSUP", -1)}


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock. ``run_dir`` and ``holder`` (the dict the holder wrote:
    pid, host, started, argv; empty when it could not be read) are attributes."""

    def __init__(self, message: str, run_dir: Path, holder: dict[str, Any]):
        super().__init__(message)
        self.run_dir = run_dir
        self.holder = holder


class RunFolderExists(ValueError):
    """A new run was asked for in a folder that already holds a run. ``run_dir`` and ``found`` (the run files
    present, in RUN_FILES order) are attributes."""

    def __init__(self, message: str, run_dir: Path, found: list[str]):
        super().__init__(message)
        self.run_dir = run_dir
        self.found = found


def lock_holder(run_dir: str | Path) -> dict[str, Any]:
    """What the current (or last) holder wrote into ``RUN/.lock``: {"pid", "host", "started", "argv"}; {} when
    the file is missing, empty or unreadable. Says nothing about whether the lock is held now."""
    try:
        text = (Path(run_dir) / LOCK_NAME).read_text()
        info = json.loads(text)
        return info if isinstance(info, dict) else {}
    except (OSError, ValueError):
        return {}


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "a process that has not written its details yet"
    parts = [f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"]
    if isinstance(holder.get("started"), (int, float)):
        parts.append(f"since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder['started']))}")
    if holder.get("argv"):
        parts.append(f"running: {' '.join(map(str, holder['argv']))}")
    return ", ".join(parts)


class RunFolderLock:
    """Context manager holding an exclusive lock on ``run_dir/.lock`` (the folder is created if needed).

    ``with RunFolderLock(run_dir): ...`` either enters holding the lock or raises :class:`RunFolderBusy`
    at once (it never waits). The lock is released on leaving the block, normally or by an exception, and by
    the kernel if the process dies. While held, ``.lock`` holds JSON ``{"pid", "host", "started", "argv"}``
    for the message another writer gets; it is emptied on release. ``mechanism`` says which lock is held:
    "flock", "lockf" (a file system without flock) or None (no locking possible: a RuntimeWarning was given).

    Within one process a second RunFolderLock on the same folder also gets RunFolderBusy with flock (locks
    belong to open files, not processes); with the lockf fallback it does not (POSIX locks belong to the
    process). Not reentrant; one instance is entered once. A ``.lock`` created by another user that this
    one may not write is opened read-only and locked all the same (flock needs no write access); the holder's
    details are then not written (lockf, which needs write access, is not available in that case).
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_NAME
        self.mechanism: str | None = None
        self._fd: int | None = None
        self._writable = False

    def __enter__(self) -> "RunFolderLock":
        if self._fd is not None:
            raise RuntimeError(f"the lock on {self.run_dir} is already held by this object")
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise NotADirectoryError(f"run folder {self.run_dir} is a file, not a folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)   # mode & ~umask, like every other file
            self._writable = True
        except PermissionError:   # another user's .lock in a folder shared with us: flock needs no write access
            fd = os.open(self.path, os.O_RDONLY)
            self._writable = False
        try:
            self.mechanism = self._lock(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        if self._writable:
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "argv": sys.argv}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())
            for leftover in stale_temporaries(self.run_dir):   # a writer killed mid-save; nobody else writes here
                leftover.unlink(missing_ok=True)
        return self

    def _lock(self, fd: int) -> str | None:
        if fcntl is None:
            self._warn_unlocked("this platform has no fcntl module")
            return None
        for name, take in (("flock", lambda: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)),
                           ("lockf", lambda: fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB))):
            try:
                take()
                return name
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise self._busy() from None
                if e.errno not in _UNSUPPORTED:
                    raise
                reason = f"{name}: {e.strerror or e}"
        self._warn_unlocked(f"the file system does not support file locks ({reason})")
        return None

    def _warn_unlocked(self, why: str) -> None:
        warnings.warn(f"run folder {self.run_dir} is not locked: {why}; a second run writing the same folder at "
                      f"the same time would not be detected", RuntimeWarning, stacklevel=4)

    def _busy(self) -> RunFolderBusy:
        holder = lock_holder(self.run_dir)
        return RunFolderBusy(
            f"run folder {self.run_dir} is in use by another fastmice process ({_describe(holder)}). Two "
            f"runs writing one folder would interleave its metrics.jsonl and replace each other's checkpoint. "
            f"Wait for that run to finish (or stop it: Ctrl-C or kill {holder.get('pid', 'PID')} checkpoints "
            f"and exits), or give this run another folder with --run-dir (or --train.run_name).",
            self.run_dir, holder)

    def release(self) -> None:
        """Release the lock (idempotent); the file stays, emptied."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if self._writable:
            try:
                os.ftruncate(fd, 0)
            except OSError:
                pass
        try:
            if self.mechanism == "flock":
                fcntl.flock(fd, fcntl.LOCK_UN)
            elif self.mechanism == "lockf":
                fcntl.lockf(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)   # closing drops the lock in any case

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __exit__(self, *exc: Any) -> None:
        self.release()


def check_new_run(run_dir: str | Path) -> None:
    """Refuse a NEW run into ``run_dir`` when it already holds a run; return None when the folder is missing,
    empty, or holds only other files (``config.yaml``, ``.lock``, data of the user's).

    Raises :class:`RunFolderExists` listing the run files found (RUN_FILES; the checkpoint is not opened,
    so this is instant) and saying what to do: ``fastmice train --resume RUN`` continues a run with a
    checkpoint, a new folder (--run-dir / --train.run_name) starts another; without a checkpoint there is
    nothing to resume, so the message says to remove the files or pick another folder. Raises
    NotADirectoryError when ``run_dir`` is a file. Call it while holding :class:`RunFolderLock`, so that no
    other run writes the folder between the check and this run's first file."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return
    if not run_dir.is_dir():
        raise NotADirectoryError(f"run folder {run_dir} is a file, not a folder")
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if not found:
        return
    listed = ", ".join(found)
    if CHECKPOINT_NAME in found:
        finished = "eval.json" in found
        what = "a finished, evaluated run" if finished else "a run (finished or interrupted)"
        message = (f"run folder {run_dir} already holds {what}: {listed}. A new run there would replace its "
                   f"checkpoint{' and leave its eval.json beside a different model' if finished else ''}. To "
                   f"continue that run: fastmice train --resume {run_dir} (more epochs: add "
                   f"--optim.epochs=N); to start another run, give it a new folder with --run-dir (or "
                   f"--train.run_name).")
    else:
        message = (f"run folder {run_dir} already holds files of a run: {listed} (and no {CHECKPOINT_NAME}, so "
                   f"there is nothing to resume). Give the new run another folder with --run-dir (or "
                   f"--train.run_name), or delete those files to reuse this one.")
    raise RunFolderExists(message, run_dir, found)
