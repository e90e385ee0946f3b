"""What the training loop watches without waiting on the device or the other ranks every step: steps skipped for a
non-finite loss or gradient, counted on the device and read on log steps; and a stop signal, which the ranks agree
on every few steps."""

from __future__ import annotations

import signal
import time
from typing import Any

import torch

from moe_diff.parallel.runtime import Runtime

STOP_CHECK_SECONDS = 2.0  # the ranks agree on a stop signal about this often (every step in one process)


class NonFiniteSteps:
    """Steps skipped for a non-finite loss or gradient norm: the current run of them, the longest run and how many
    were skipped since the last read, kept on the device."""

    def __init__(self, streak: int, device: torch.device):
        self.device = device
        self.counts = torch.tensor([streak, streak, 0], device=device)

    def count(self, finite: torch.Tensor) -> None:
        """Add one step: `finite` (0-dim bool) whether it was taken."""
        streak = torch.where(finite, 0, self.counts[0] + 1)
        self.counts = torch.stack([streak, torch.maximum(self.counts[1], streak), self.counts[2] + (~finite)])

    @property
    def streak(self) -> int:
        """Steps skipped in a row now (read back)."""
        return int(self.counts[0].item())

    def read(self) -> tuple[int, int, int]:
        """(steps skipped in a row now, the longest run of them, steps skipped) since the last read."""
        streak, longest, skipped = self.counts.tolist()
        self.counts = torch.tensor([streak, streak, 0], device=self.device)
        return streak, longest, skipped


class StopFlag:
    """Turns SIGTERM and SIGINT into a request to save and stop after the current step. The ranks of a job agree on
    it every few steps (about every STOP_CHECK_SECONDS, the same steps on every rank), so that a step does not wait
    on the slowest rank to read a flag."""

    def __init__(self, job: Runtime, device: torch.device, step: int) -> None:
        """`step`: the last step done before the loop starts (a resumed run's)."""
        self.job, self.device = job, device
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._next_check, self._last_step, self._last_time = step + 1, step, time.perf_counter()

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def requested(self, step: int) -> bool:
        """Whether the job stops after `step`: a rank was signalled, and the ranks agreed on it at this step."""
        if not self.job.distributed:
            return self.signal is not None
        if step < self._next_check:
            return False
        now = time.perf_counter()
        per_step = (now - self._last_time) / (step - self._last_step)
        interval = max(1, int(STOP_CHECK_SECONDS / per_step)) if per_step > 0 else 1
        signalled, shortest = self.job.maximum([float(self.signal is not None), -interval], self.device)
        self._next_check, self._last_step, self._last_time = step - int(shortest), step, now
        return signalled > 0
