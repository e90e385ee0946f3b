"""One job per run directory: the job that writes `train.out_dir` holds `OUT_DIR/run.lock` while it runs.

The lock is a small JSON file (host, pid, start time, a random token) created with O_EXCL, which is atomic on local
and on shared (NFS v3+) filesystems, and refreshed (its mtime touched) every REFRESH_S seconds. A second job stops at
once, naming the holder. A lock whose holder is dead is taken over with a note: on the same host, when no process has
its pid (or its pid was reused: the lock went unrefreshed for STALE_AFTER_S); from another host, when it went
unrefreshed for STALE_AFTER_S.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from rich.console import Console

from moe_diff.errors import MoeDiffError
from moe_diff.parallel.runtime import Runtime

LOCK_FILE = "run.lock"
REFRESH_S = 30.0
STALE_AFTER_S = 600.0  # ten minutes without a refresh: the holder is gone (or hung past any save)


class RunLockError(MoeDiffError, RuntimeError):
    """The run directory is in use by another job."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    token: str  # tells this holder's lock from a later one with the same host and pid

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   uuid.uuid4().hex)

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, started {self.started}"


def read_holder(path: Path) -> Holder | None:
    """The lock's holder, or None where the file is gone or unreadable (a holder still writing it, or debris)."""
    try:
        return Holder(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def stale_reason(holder: Holder | None, seconds_since_refresh: float, stale_after_s: float) -> str | None:
    """Why the lock's holder must be dead, or None while it may be running."""
    unrefreshed = seconds_since_refresh > stale_after_s
    if holder is None:
        return f"an unreadable lock, unchanged for {seconds_since_refresh:.0f} s" if unrefreshed else None
    if holder.host == socket.gethostname() and not pid_alive(holder.pid):
        return f"{holder.describe()}: no process has that pid on this host"
    if unrefreshed:
        return f"{holder.describe()}: not refreshed for {seconds_since_refresh:.0f} s (more than {stale_after_s:.0f})"
    return None


class RunLock:
    """Holds `run_dir/run.lock` from acquire() to release(), refreshing it from a daemon thread."""

    def __init__(self, run_dir: Path, refresh_s: float = REFRESH_S, stale_after_s: float = STALE_AFTER_S):
        self.path = Path(run_dir) / LOCK_FILE
        self.refresh_s, self.stale_after_s = refresh_s, stale_after_s
        self.holder = Holder.this_process()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> list[str]:
        """Take the lock (RunLockError if another job holds it); return a note for each dead holder's lock taken
        over."""
        notes = []
        while not self._create():
            holder = read_holder(self.path)
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            reason = stale_reason(holder, age, self.stale_after_s)
            if reason is None:
                if holder is None:  # being written this instant
                    time.sleep(0.1)
                    continue
                raise RunLockError(f"{self.path.parent} is in use by another job ({holder.describe()}; lock "
                                   f"{self.path}): wait for it to end, or give this job another train.out_dir")
            if self._remove_if_unchanged(holder):
                notes.append(f"took over the lock of a job that is gone ({reason})")
        self._thread = threading.Thread(target=self._refresh, name="run-lock-refresh", daemon=True)
        self._thread.start()
        return notes

    def _create(self) -> bool:
        """Write the lock if there is none; False if there is one."""
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            json.dump(asdict(self.holder), file)
            file.flush()
            os.fsync(file.fileno())
        return True

    def _remove_if_unchanged(self, stale: Holder | None) -> bool:
        """Move the stale lock aside and delete it, unless it turns out to be a newer holder's (two jobs taking over
        at once): that one is put back. False when the lock was not removed by this call."""
        aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.holder.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        if read_holder(aside) != stale:
            with contextlib.suppress(FileExistsError):  # yet another lock exists meanwhile: that one wins
                os.link(aside, self.path)
            aside.unlink()
            return False
        aside.unlink()
        return True

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        """Stop refreshing and remove the lock, if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if read_holder(self.path) == self.holder:
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def holding_run_directory(out_dir: Path, job: Runtime, console: Console) -> Iterator[None]:
    """Rank 0 holds the run directory's lock while the job runs; if it cannot, every rank stops with its error."""
    out_dir.mkdir(parents=True, exist_ok=True)
    lock, refusal = RunLock(out_dir), None
    if job.is_main:
        try:
            for note in lock.acquire():
                console.print(f"[yellow]{note}[/]", soft_wrap=True)
        except RunLockError as error:
            refusal = str(error)
    refusals = [message for message in job.gather_objects(refusal) if message]
    if refusals:
        raise RunLockError(refusals[0])
    try:
        yield
    finally:
        if job.is_main:
            lock.release()
