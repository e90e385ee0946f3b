"""One job per run directory: the job that writes `train.out_dir` holds `OUT_DIR/run.lock` while it runs.

The lock is a small JSON file (host, pid and pid namespace, start time, a random token), written whole under a
name of its own and hard-linked into place, which is atomic on local and on shared (NFS) filesystems, so a lock
is never seen half written; its holder touches it every REFRESH_S seconds. A second job stops at once, naming the
holder. A lock whose holder is gone is taken over with a note: on the same host and pid namespace when no process
has its pid; otherwise (another host, another container, or a pid reused since) when it went unrefreshed for
STALE_AFTER_S. A takeover replaces the stale lock in one rename while holding `run.lock.takeover`, after checking
again that the lock is still the stale one, so two jobs taking over at once cannot both win, and a live lock is
never removed.
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

from moe_diff.errors import MoeDiffError, literal
from moe_diff.parallel.runtime import Runtime

LOCK_FILE = "run.lock"
TAKEOVER_FILE = "run.lock.takeover"  # held while a dead holder's lock is replaced
REFRESH_S = 30.0
STALE_AFTER_S = 600.0  # ten minutes without a refresh: the holder is gone (or hung past any save)
TAKEOVER_STALE_S = 60.0  # a takeover file this old belongs to a job that died while taking over
UNREADABLE_WAIT_S = 2.0  # how long an unreadable lock may be one still being written in place


def pid_namespace() -> int | None:
    """This process's pid namespace (containers on one host have their own), where the system tells it."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


class RunLockError(MoeDiffError, RuntimeError):
    """The run directory is in use by another job."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: str  # ISO 8601, UTC
    token: str  # tells this holder's lock from a later one with the same host and pid
    pid_namespace: int | None = None

    @classmethod
    def this_process(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   uuid.uuid4().hex, pid_namespace())

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
    if (holder.host, holder.pid_namespace) == (socket.gethostname(), pid_namespace()) and not pid_alive(holder.pid):
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
        notes, unreadable_since = [], None
        while not self._place():
            holder = read_holder(self.path)
            reason = self._stale_reason(holder)
            if reason is None:
                if holder is None:  # a lock being created in place (no hard links), or debris
                    unreadable_since = unreadable_since or time.monotonic()
                    if time.monotonic() - unreadable_since < UNREADABLE_WAIT_S:
                        time.sleep(0.1)
                        continue
                    raise RunLockError(f"{self.path} is not a lock a job wrote (it is empty or not a lock's JSON), "
                                       f"so whether a job uses {self.path.parent} is unknown. If none does, remove "
                                       f"{self.path} and start again; an unreadable lock unchanged for "
                                       f"{self.stale_after_s:.0f} s is taken over")
                raise RunLockError(f"{self.path.parent} is in use by another job ({holder.describe()}; lock "
                                   f"{self.path}): wait for it to end, or give this job another train.out_dir")
            if self._take_over(holder):
                notes.append(f"took over the lock of a job that is gone ({reason})")
                break
        self._thread = threading.Thread(target=self._refresh, name="run-lock-refresh", daemon=True)
        self._thread.start()
        return notes

    def _stale_reason(self, holder: Holder | None) -> str | None:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None  # released meanwhile: the next attempt to place ours decides
        return stale_reason(holder, age, self.stale_after_s)

    def _written(self) -> Path:
        """This holder's lock, written whole under a name of its own."""
        own = self.path.with_name(f"{LOCK_FILE}.{self.holder.token}")
        with own.open("w") as file:
            json.dump(asdict(self.holder), file)
            file.flush()
            os.fsync(file.fileno())
        return own

    def _place(self) -> bool:
        """Link this holder's lock into place if there is none; False if there is one."""
        if self.path.exists():
            return False
        own = self._written()
        try:
            os.link(own, self.path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: an exclusive create, written at once
            return self._create_in_place()
        finally:
            own.unlink(missing_ok=True)
        return True

    def _create_in_place(self) -> bool:
        try:
            descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(descriptor, "w") as file:
            json.dump(asdict(self.holder), file)
        return True

    def _take_over(self, stale: Holder | None) -> bool:
        """Replace the stale lock by this holder's in one rename, holding the takeover file, if the lock is still
        that stale one; False when another job is taking over or the lock changed meanwhile."""
        takeover = self.path.with_name(TAKEOVER_FILE)
        try:
            os.close(os.open(takeover, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - takeover.stat().st_mtime > TAKEOVER_STALE_S:
                    takeover.unlink()  # left by a job that died while taking over
            time.sleep(0.1)
            return False
        try:
            if read_holder(self.path) != stale or self._stale_reason(stale) is None:
                return False
            os.replace(self._written(), self.path)
            return True
        finally:
            takeover.unlink(missing_ok=True)

    def _refresh(self) -> None:
        """Touch the lock while it is this holder's."""
        while not self._stop.wait(self.refresh_s):
            if read_holder(self.path) == self.holder:
                with contextlib.suppress(FileNotFoundError):
                    os.utime(self.path)

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
                console.print(f"[yellow]{literal(note)}[/]", soft_wrap=True)
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
