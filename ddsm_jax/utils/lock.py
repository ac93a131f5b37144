"""One run per workdir: a lock held for the length of a run, saying who holds it.

Two runs in one workdir would interleave their metrics and leave one's checkpoints under the
other's results. On a local (or NFS) disk the lock is an `flock` on WORKDIR/lock, which the kernel
releases when its process dies, so a crashed run never blocks the next; the file records the
holder (host, pid, command, start) for the message a second run prints. An object store (gs://)
has no locks: there the file itself is the lock, and the holder rewrites it every minute; one
left unrefreshed for `stale_after` seconds (a preempted VM) is taken over with a message.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time
from typing import Any

from etils import epath

from ddsm_jax.common_types import PathLike
from ddsm_jax.layout import Workdir
from ddsm_jax.utils.files import as_path, is_remote, write_json


class WorkdirBusyError(RuntimeError):
    """Another run holds the workdir."""


def _holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "command": " ".join(sys.argv),
            "started": datetime.datetime.now().isoformat(timespec="seconds"),
            "heartbeat": time.time()}


def _describe(holder: dict[str, Any]) -> str:
    return (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since "
            f"{holder.get('started', '?')} ({holder.get('command', '?')})")


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir for the block. It creates the workdir,
    and removes it again if the run wrote nothing there."""

    def __init__(self, workdir: PathLike, *, stale_after: float = 300.0, heartbeat: float = 60.0):
        self.workdir = as_path(workdir)
        self.path = Workdir(self.workdir).lock
        self.stale_after, self.heartbeat = stale_after, heartbeat
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._created = False

    def _read_holder(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _busy(self, holder: dict[str, Any]) -> WorkdirBusyError:
        return WorkdirBusyError(
            f"{self.workdir} is in use by {_describe(holder)}; wait for that run to end or use "
            f"another --workdir (if it is gone, delete {self.path})")

    def acquire(self) -> WorkdirLock:
        self._created = not self.workdir.exists()
        self.workdir.mkdir(parents=True, exist_ok=True)
        if is_remote(self.workdir):
            self._acquire_remote()
        else:
            self._acquire_local()
        return self

    def _acquire_local(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._busy(self._read_holder()) from None
        previous = self._read_holder()  # empty unless its holder died without releasing it
        if previous.get("pid"):
            print(f"taking over the lock of {self.workdir} left by {_describe(previous)}, which "
                  f"ended without releasing it", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder()).encode(), 0)
        self._fd = fd

    def _acquire_remote(self) -> None:
        if self.path.exists():
            previous = self._read_holder()
            age = time.time() - float(previous.get("heartbeat", 0))
            if age < self.stale_after:
                raise self._busy(previous)
            print(f"taking over the lock of {self.workdir} left by {_describe(previous)}: no "
                  f"heartbeat for {age:.0f} s", file=sys.stderr)
        holder = _holder()
        write_json(self.path, holder)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(holder,), daemon=True)
        self._thread.start()

    def _refresh(self, holder: dict[str, Any]) -> None:
        while not self._stop.wait(self.heartbeat):
            holder["heartbeat"] = time.time()
            with contextlib.suppress(OSError):  # a missed heartbeat only ages the lock
                write_json(self.path, holder)

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: nobody holds it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            epath.Path(self.path).unlink(missing_ok=True)
        if (self._created and not is_remote(self.workdir)  # (object stores have no empty folders)
                and [p.name for p in self.workdir.iterdir()] in ([], [self.path.name])):
            # A run that failed before writing anything leaves no trace of itself.
            self.path.unlink(missing_ok=True)
            self.workdir.rmdir()

    def __enter__(self) -> WorkdirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
