"""One job per run directory: a second training job stops at once naming the holder; a dead holder's lock (killed,
or on another host and no longer refreshed) is taken over with a note."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import small_config  # tests/ is on the path

from moe_diff.config import to_yaml
from moe_diff.runs import read_metrics
from moe_diff.training.run_lock import LOCK_FILE, RunLock, RunLockError, pid_namespace, read_holder


def start_job(config: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "moe_diff.train", str(config), *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def wait_for(condition, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_a_second_job_stops_at_once_and_a_killed_holder_is_taken_over(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(small_config(out, "train.max_steps=100000", "train.save_every=0",
                                           "train.eval_every=0")))
    first = start_job(config)
    try:
        wait_for(lambda: (out / "metrics.jsonl").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2)
        holder = read_holder(out / LOCK_FILE)
        assert holder is not None and holder.pid == first.pid and holder.host == socket.gethostname()
        lines_before = (out / "metrics.jsonl").read_text().count("\n")
        second = subprocess.run([sys.executable, "-m", "moe_diff.train", str(config)], capture_output=True,
                                text=True, timeout=120)
        assert second.returncode == 2
        message = " ".join(second.stderr.split())
        assert f"error: {out} is in use by another job (host {holder.host}, pid {first.pid}, started " \
               f"{holder.started}" in message and "Traceback" not in message
        assert not (out / "checkpoints").exists()  # the second job wrote nothing
        steps = [record["step"] for record in read_metrics(out / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1)) and len(steps) >= lines_before  # one writer
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert read_holder(out / LOCK_FILE).pid == first.pid  # left behind by the killed job
    third = subprocess.run([sys.executable, "-m", "moe_diff.train", str(config), "train.max_steps=2",
                            "train.resume=restart"], capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr
    said = " ".join(third.stdout.split())
    assert f"took over the lock of a job that is gone (host {holder.host}, pid {first.pid}" in said
    assert "no process has that pid on this host" in said
    assert not (out / LOCK_FILE).exists()  # released at the end


def write_lock(run_dir: Path, host: str, pid: int, age_s: float) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": host, "pid": pid, "started": "2026-01-01T00:00:00+00:00", "token": "t"}))
    moment = time.time() - age_s
    os.utime(path, (moment, moment))
    return path


def test_another_hosts_lock_holds_while_refreshed_and_is_taken_over_once_stale(tmp_path: Path) -> None:
    write_lock(tmp_path, "gpu-node-7", 4242, age_s=60)
    with pytest.raises(RunLockError, match="in use by another job .host gpu-node-7, pid 4242, started 2026-01-01"):
        RunLock(tmp_path, stale_after_s=600).acquire()
    write_lock(tmp_path, "gpu-node-7", 4242, age_s=700)
    lock = RunLock(tmp_path, stale_after_s=600)
    (note,) = lock.acquire()
    assert "host gpu-node-7, pid 4242" in note and "not refreshed for 700 s (more than 600)" in note
    assert read_holder(tmp_path / LOCK_FILE) == lock.holder
    lock.release()
    assert not (tmp_path / LOCK_FILE).exists()


def test_the_holder_refreshes_its_lock(tmp_path: Path) -> None:
    lock = RunLock(tmp_path, refresh_s=0.05)
    assert lock.acquire() == []
    moment = time.time() - 1000
    os.utime(tmp_path / LOCK_FILE, (moment, moment))
    wait_for(lambda: time.time() - (tmp_path / LOCK_FILE).stat().st_mtime < 10, seconds=10)
    with pytest.raises(RunLockError):  # same host, live pid: held
        RunLock(tmp_path, stale_after_s=600).acquire()
    lock.release()
    write_lock(tmp_path, "other-host", 1, age_s=0)
    lock.release()  # not its lock any more: left alone
    assert read_holder(tmp_path / LOCK_FILE).host == "other-host"


def test_two_jobs_taking_over_one_stale_lock_cannot_both_win(tmp_path: Path) -> None:
    import threading

    for attempt in range(5):
        run_dir = tmp_path / str(attempt)
        write_lock(run_dir, "gpu-node-7", 4242, age_s=700)
        outcomes: list[str] = []
        locks = [RunLock(run_dir, stale_after_s=600) for _ in range(2)]

        def take(lock: RunLock, outcomes: list[str] = outcomes) -> None:
            try:
                lock.acquire()
                outcomes.append("held")
            except RunLockError:
                outcomes.append("refused")

        threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(outcomes) == ["held", "refused"]
        winner = next(lock for lock in locks if read_holder(run_dir / LOCK_FILE) == lock.holder)
        winner.release()
        assert sorted(p.name for p in run_dir.iterdir()) == []  # no lock, takeover or temporary file left


def test_another_pid_namespace_on_the_same_host_is_judged_by_its_refreshes(tmp_path: Path) -> None:
    """A container sharing the host name cannot see the holder's pid: only the refreshes tell it is gone."""
    path = write_lock(tmp_path, socket.gethostname(), 2**22 + 1, age_s=60)  # no such pid here
    holder = json.loads(path.read_text()) | {"pid_namespace": 1}
    path.write_text(json.dumps(holder))
    with pytest.raises(RunLockError, match="in use by another job"):
        RunLock(tmp_path).acquire()
    path.write_text(json.dumps(holder | {"pid_namespace": pid_namespace()}))  # as if written in this namespace
    lock = RunLock(tmp_path)
    (note,) = lock.acquire()
    assert "no process has that pid on this host" in note
    lock.release()


def test_an_unreadable_lock_is_taken_over_once_stale(tmp_path: Path) -> None:
    (tmp_path / LOCK_FILE).write_text("")  # debris of a write that failed
    lock = RunLock(tmp_path, stale_after_s=0.5)
    (note,) = lock.acquire()
    assert "an unreadable lock" in note and read_holder(tmp_path / LOCK_FILE) == lock.holder
    lock.release()


def test_a_lock_that_is_not_a_locks_json_stops_the_job_at_once_with_the_way_out(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_FILE).write_text("{}")  # as a user or another tool left it
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(small_config(out)))
    job = subprocess.run([sys.executable, "-m", "moe_diff.train", str(config)], capture_output=True, text=True,
                         timeout=120)  # not the 10 minutes after which an unreadable lock counts as stale
    assert job.returncode == 2
    message = " ".join(job.stderr.split())
    assert (f"error: {out / LOCK_FILE} is not a lock a job wrote (it is empty or not a lock's JSON), so whether a "
            f"job uses {out} is unknown. If none does, remove {out / LOCK_FILE} and start again") in message
    assert (out / LOCK_FILE).read_text() == "{}" and not (out / "checkpoints").exists()
