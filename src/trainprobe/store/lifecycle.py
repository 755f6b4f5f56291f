"""Who writes a run, and whether it finished, failed, is still running or was abandoned.

One process writes a run at a time. A writer holds an exclusive ``flock`` on
``run_dir/writer.lock`` (the file also names it: pid, host, start time) from opening the
run until closing it; the operating system drops the lock when the process dies, SIGKILL
and out-of-memory kills included, so a lock that nobody holds means no writer is alive.
Another writer is refused with :class:`RunInUseError` naming the holder; a reader only
tests the lock (a shared, non-blocking ``flock`` released at once) and never waits.

The rule :func:`run_state` applies, to the run's ``status`` metadata:

- ``"finished"``: the writer closed the run normally;
- ``"failed"``: the watched code raised (``status`` is ``"failed: <error>"``);
- ``"running"``: ``status`` is ``"running"`` and a process holds the writer lock;
- ``"abandoned"``: ``status`` is ``"running"`` but no process holds the lock: the writer
  died without closing the run (killed, or its machine stopped);
- ``"unknown"``: no ``status`` (a run database not written by :class:`RunWriter`).

Where the lock cannot be tested (no ``fcntl``, e.g. Windows, or a file system that refuses
``flock``) a writer on the same host counts as alive while its pid exists, and one on
another host as alive: such a run is never called abandoned by guesswork.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .schema import DB_NAME

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no flock, see the module docstring
    fcntl = None

LOCK_NAME = "writer.lock"
_WAIT_SECONDS = 0.25  # a reader's test holds the lock for microseconds: let it pass


class RunInUseError(ValueError):
    """Another live process writes the run directory; ``writer`` names it (pid, host)."""

    def __init__(self, message: str, writer: dict[str, Any]) -> None:
        super().__init__(message)
        self.writer = writer


@dataclass(frozen=True)
class RunState:
    """A run's lifecycle state (see :mod:`trainprobe.store.lifecycle` for the rule).

    Attributes:
        name: ``"finished"``, ``"failed"``, ``"running"``, ``"abandoned"`` or ``"unknown"``.
        status: the ``status`` metadata as stored (``"failed: ValueError: ..."``), or None.
        writer: ``{"pid", "host", "started"}`` of the live writer (``running``) or of the
            last one (otherwise), or None when the run does not name one.
    """

    name: str
    status: str | None = None
    writer: dict[str, Any] | None = None

    def describe(self) -> str:
        """One line for a terminal, e.g. ``failed (ValueError: ...)`` or ``abandoned (its
        writer, process 12 on host h, since ..., stopped without closing the run: ...)``."""
        who = _who(self.writer) if self.writer else ""
        if self.name == "failed":
            return f"failed ({(self.status or '').removeprefix('failed: ')})"
        if self.name == "running":
            return f"running (written now by {who})" if who else "running"
        if self.name == "abandoned":
            return (
                f"abandoned (its writer{f', {who},' if who else ''} stopped without closing "
                "the run: killed, or its machine went down)"
            )
        if self.name == "unknown":
            return "unknown (the run records no status)"
        return self.name


def identity() -> dict[str, Any]:
    """This process as a writer: pid, host and the time it opened the run."""
    now = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    return {"pid": os.getpid(), "host": socket.gethostname(), "started": now}


class WriterLock:
    """The exclusive writer lock of one run directory, held from :meth:`acquire` to
    :meth:`release`."""

    def __init__(self, path: Path, fd: int | None) -> None:
        self.path, self._fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path, me: dict[str, Any]) -> WriterLock:
        """Take the lock of ``run_dir`` (an existing directory) and write ``me`` into it.

        Raises:
            RunInUseError: a live process holds it.
            OSError: the lock file cannot be created (e.g. a read-only directory).
        """
        path = run_dir / LOCK_NAME
        deadline = time.monotonic() + _WAIT_SECONDS
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            held = _try_lock(fd, exclusive=True)
            if held is False:
                holder = _read(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise RunInUseError(f"{run_dir} is being written by {_who(holder)}", holder)
            if held is None or _same_file(fd, path):
                break  # locked (or no locking here: see the module docstring)
            os.close(fd)  # a closing writer removed that file meanwhile: lock the new one
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        return cls(path, fd)

    def release(self) -> None:
        """Remove the lock file (a finished run is one file) and drop the lock."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):  # removed while held: no other writer races it
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def check_is_not_a_file(run_dir: Path) -> None:
    """Refuse a ``run_dir`` that is a file, saying what to pass instead.

    Raises:
        ValueError: ``run_dir`` exists and is not a directory.
    """
    if run_dir.exists() and not run_dir.is_dir():
        hint = (
            f"pass its directory, {run_dir.parent}"
            if run_dir.name == DB_NAME
            else "pass a directory (it is created when missing)"
        )
        raise ValueError(f"run_dir {run_dir} is a file, not a directory; {hint}")


def lock_run_dir(run_dir: Path, writer: dict[str, Any], *, resume: bool) -> WriterLock:
    """Create ``run_dir`` and take its writer lock, with errors that say what to do.

    Raises:
        RunInUseError: a live process writes the run (the advice depends on ``resume``).
        PermissionError: the directory cannot be created or written.
        ValueError: ``run_dir`` is a file, or one of its parents is.
    """
    check_is_not_a_file(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        return WriterLock.acquire(run_dir, writer)
    except RunInUseError as err:
        advice = (
            "resume=True continues a run only once its writer has stopped: stop that process "
            "(or wait for it) first"
            if resume
            else "wait for it to finish, stop it, or choose another run_dir"
        )
        raise RunInUseError(f"{err}; {advice}", err.writer) from None
    except OSError as err:
        what = f"cannot write a run in {run_dir}: {err.strerror or err}"
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise PermissionError(
                f"{what} (the directory is read-only); choose a writable run_dir, or copy "
                "the run somewhere writable to continue it"
            ) from err
        raise ValueError(f"{what}; pass a directory path whose parents are directories") from err


def live_writer(run_dir: Path) -> tuple[bool | None, dict[str, Any] | None]:
    """``(alive, writer)``: whether a process holds ``run_dir``'s writer lock now (None:
    cannot tell) and the identity written in the lock file (None: no lock file)."""
    try:
        fd = os.open(run_dir / LOCK_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return False, None
    except OSError:
        return None, None
    try:
        held = _try_lock(fd, exclusive=False)
        holder = _read(fd)
        if held is None:
            return _pid_alive(holder), holder
        if held:
            fcntl.flock(fd, fcntl.LOCK_UN)
        return not held, holder
    finally:
        os.close(fd)


def run_state(run_dir: Path, read_meta: Callable[[str], Any]) -> RunState:
    """The state of the run in ``run_dir`` now; ``read_meta(key)`` reads one metadata value
    fresh from the database. The lock is tested before ``status`` is read (a writer stores
    its final status before it lets the lock go) and again when they disagree (a writer
    that took the lock meanwhile has stored ``running`` after taking it)."""
    alive, holder = live_writer(run_dir)
    status = read_meta("status")
    if status == "running" and alive is False:
        alive, holder = live_writer(run_dir)
    last = holder or read_meta("writer")
    last = last if isinstance(last, dict) else None
    if not isinstance(status, str):
        return RunState("unknown", None, last)
    if status == "running":
        return RunState("abandoned" if alive is False else "running", status, last)
    name = "failed" if status.startswith("failed") else "finished"
    return RunState(name, status, last)


def _try_lock(fd: int, *, exclusive: bool) -> bool | None:
    """True when locked now, False when another holds it, None when locking is unsupported."""
    if fcntl is None:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES):
            return False
        return None  # ENOLCK, EOPNOTSUPP...: this file system has no flock
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _read(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 4096) or b"null")
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(writer: dict[str, Any] | None) -> bool | None:
    """Whether the writer's pid exists, when it ran on this host and this is POSIX."""
    if not writer or writer.get("host") != socket.gethostname() or os.name != "posix":
        return None
    try:
        os.kill(int(writer["pid"]), 0)  # signal 0: a test for existence, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    except (KeyError, TypeError, ValueError):
        return None
    return True


def _who(writer: dict[str, Any] | None) -> str:
    """``process 12 on host h, since <time>``, or ``another process`` when unnamed."""
    if not writer:
        return "another process"
    started = f", since {writer['started']}" if writer.get("started") else ""
    return f"process {writer.get('pid', '?')} on host {writer.get('host', '?')}{started}"
