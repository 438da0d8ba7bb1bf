"""Runs that must not clobber each other or end looking successful: errors, locks, atomic writes.

Kept free of torch imports (``deforest-tile`` starts without torch), so the CLI error handler
can name these errors too.

* :class:`RunLock`: one process per run directory. ``<run dir>/deforest.lock`` holds an
  ``flock`` for as long as the run lives and names its holder (pid, host, start time); a
  second run in the same directory refuses with :class:`RunDirLocked`. The kernel drops the
  ``flock`` when its holder dies, so a lock left by a killed run is taken over.
* atomic writes themselves are :mod:`deforest.core.outputs` (one writer for reports, maps,
  caches and indexes: a unique temporary file beside the target, fsynced, renamed over it, so
  concurrent writers never leave a mix of two writes and readers never see half a file).
* :func:`temp_name_owner` / :func:`stale_temp`: temporary files name the host and pid that
  write them; a writer removes only leftovers of processes that are gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LOCK_NAME = "deforest.lock"
#: exit status of a run stopped by SIGTERM after saving ``last.ckpt`` (128 + SIGTERM, what a
#: shell reports for a process the signal ended): non-zero, so schedulers see it did not finish
EXIT_INTERRUPTED = 143
#: errnos of a write the file system refused for lack of room
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or cannot be written (disk full), named with the problem."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint holding pickled objects (code) that ``weights_only`` loading refuses."""


class RunDirLocked(RuntimeError):
    """Another live process holds the run directory."""


class RunInterrupted(RuntimeError):
    """The run was stopped by a signal (SIGTERM) after saving what it needs to resume."""


# ---- temporary files that name their writer -----------------------------------------------
def host_name() -> str:
    """This host's name, safe inside a file name."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in socket.gethostname()) or "host"


def temp_prefix(target: str | os.PathLike) -> str:
    """``.<name>.<host>.<pid>.``: the prefix of this process's temporary files for ``target``."""
    return f".{Path(target).name}.{host_name()}.{os.getpid()}."


def temp_name_owner(temp: Path, target: str | os.PathLike) -> tuple[str, int] | None:
    """``(host, pid)`` of the process that wrote ``temp`` (a temporary file for ``target``)."""
    head = f".{Path(target).name}."
    if not temp.name.startswith(head):
        return None
    parts = temp.name[len(head):].split(".")
    if len(parts) < 3 or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1])


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def stale_temp(temp: Path, target: str | os.PathLike) -> bool:
    """A temporary file of ``target`` whose writer is gone: one of this host, of a dead pid.

    Files of other hosts, of live processes and of this process are never stale (another
    writer may be in the middle of its save).
    """
    owner = temp_name_owner(temp, target)
    if owner is None:
        return False
    host, pid = owner
    return host == host_name() and pid != os.getpid() and not pid_alive(pid)


def remove_stale_temps(target: str | os.PathLike, suffix: str = ".tmp") -> None:
    """Delete the leftovers of killed writers of ``target`` (see :func:`stale_temp`)."""
    target = Path(target)
    for temp in target.parent.glob(f".{target.name}.*{suffix}"):
        if stale_temp(temp, target):
            temp.unlink(missing_ok=True)


# ---- one run per run directory -------------------------------------------------------------
def is_launching_process() -> bool:
    """False in the extra processes of a distributed run (DDP ranks > 0, Lightning's re-launched
    children, SLURM tasks > 0): they share the run directory of the process that holds it."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "NODE_RANK"))


class RunLock:
    """``<run dir>/deforest.lock``: held with ``flock`` while the run lives, naming its holder.

    :meth:`acquire` raises :class:`RunDirLocked` when a live process holds the directory;
    the lock file of a run that died (SIGKILL, out of memory) no longer holds an ``flock``
    and is taken over. Where the file system has no ``flock``, the recorded pid is checked
    instead (on this host; a lock of another host is then refused until deleted by hand).
    """

    _held: dict[str, "RunLock"] = {}  # run dirs this process holds, so nested callers share one

    def __init__(self, run_dir: str | os.PathLike) -> None:
        self.run_dir = Path(run_dir).expanduser().resolve()
        self.path = self.run_dir / LOCK_NAME
        self._fd: int | None = None
        self._depth = 0

    @classmethod
    def hold(cls, run_dir: str | os.PathLike) -> "RunLock":
        """The lock of ``run_dir``, acquired (or the one this process already holds)."""
        key = str(Path(run_dir).expanduser().resolve())
        lock = cls._held.get(key) or cls(run_dir)
        lock.acquire()
        return lock

    def acquire(self) -> None:
        if self._depth:
            self._depth += 1
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(10):  # the file may be replaced between open and flock: retry on a new one
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                if not self._lock(fd):
                    raise RunDirLocked(self._refusal())
                if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    break
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)  # locked a file another process just removed
        else:
            raise RunDirLocked(f"{self.run_dir}: could not take {self.path} (it keeps being replaced)")
        previous = self.holder()
        if previous and previous.get("pid") != os.getpid():
            log.info("taking over %s left by pid %s on %s (that run is gone)", self.path, previous.get("pid"), previous.get("host"))
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd, self._depth = fd, 1
        RunLock._held[str(self.run_dir)] = self

    def _lock(self, fd: int) -> bool:
        """Take the ``flock``; False when a live process holds it."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as err:  # no flock on this file system: trust the recorded pid
            if err.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            holder = self.holder()
            if not holder or holder.get("pid") == os.getpid():
                return True
            same_host = holder.get("host") == socket.gethostname()
            return same_host and not pid_alive(int(holder.get("pid", 0)))

    def holder(self) -> dict | None:
        """What the lock file says about its holder (None when empty or unreadable)."""
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def _refusal(self) -> str:
        holder = self.holder() or {}
        return (
            f"{self.run_dir} is in use by pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
            f"(since {holder.get('started', '?')}; lock file {self.path}): give this run another hydra.run.dir, "
            f"or wait for that one to end"
        )

    def release(self) -> None:
        if not self._depth:
            return
        self._depth -= 1
        if self._depth:
            return
        RunLock._held.pop(str(self.run_dir), None)
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # still holding the flock: nobody else has it
        finally:
            os.close(fd)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


@contextmanager
def run_dir_lock(run_dir: str | os.PathLike) -> Iterator[RunLock | None]:
    """Hold ``run_dir`` for the block (nothing in the extra processes of a distributed run)."""
    if not is_launching_process():
        yield None
        return
    lock = RunLock.hold(run_dir)
    try:
        yield lock
    finally:
        lock.release()


try:  # the Hydra callback; hydra is always installed with deforest, but keep this module importable alone
    from hydra.experimental.callback import Callback as _HydraCallback
except ImportError:  # pragma: no cover
    _HydraCallback = object  # type: ignore[assignment,misc]


class RunDirLockCallback(_HydraCallback):
    """Hydra callback: take the run directory's lock before Hydra writes anything into it.

    Hydra saves ``.hydra/*.yaml`` and opens ``<task>.log`` in the run directory before the
    command itself starts; a second run of the same ``hydra.run.dir`` is refused here, so it
    leaves the first run's records untouched. (Multirun jobs are locked by the commands.)
    """

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        if not is_launching_process():
            return
        try:
            run_dir = str(config.hydra.run.dir)
        except Exception:  # an interpolation that needs Hydra's runtime: the command locks it
            return
        try:
            lock = RunLock.hold(run_dir)
        except RunDirLocked as err:
            # logging is not set up yet: one line on stderr, as exit_on_user_error writes it
            print(f"[deforest.core.safety][ERROR] - RunDirLocked: {err}", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        except OSError as err:
            # a read-only, full or unreachable folder: Hydra would only warn here and then fail
            # with a traceback opening its log file in it
            print(f"[deforest.core.safety][ERROR] - OutputError: {Path(run_dir).expanduser().resolve()}: cannot be written "
                  f"({err.strerror or err}): give hydra.run.dir= a writable folder", file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        import atexit

        self._lock = lock
        atexit.register(lock.release)  # also when the command ends with SystemExit (on_run_end is skipped)

    def on_run_end(self, config: Any, **kwargs: Any) -> None:
        lock = getattr(self, "_lock", None)
        if lock is not None:
            self._lock = None
            lock.release()
