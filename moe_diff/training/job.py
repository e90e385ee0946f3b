"""One training job: its processes (one, or torchrun's ranks), the run directory's lock and the trainer."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console

from moe_diff.config import Config
from moe_diff.device import resolve_device
from moe_diff.parallel import runtime
from moe_diff.training.run_lock import holding_run_directory
from moe_diff.training.trainer import Trainer, TrainingError


def collective_failure(error: RuntimeError) -> bool:
    """A collective that failed (NCCL, and gloo's connection errors) or timed out (gloo says so in words)."""
    return isinstance(error, torch.distributed.DistError) or "Timed out" in str(error)


@contextlib.contextmanager
def training_job(cfg: Config, console: Console) -> Iterator[Trainer]:
    """The trainer of this process's rank, inside the job's process group and holding the run directory; a
    collective that fails or times out (another rank failed or hung) ends the job with a TrainingError."""
    job = runtime.start(cfg.parallel, resolve_device(cfg.train.device))
    try:
        with holding_run_directory(Path(cfg.train.out_dir), job, console):
            yield Trainer(cfg, console, job)
    except RuntimeError as error:
        if not job.distributed or not collective_failure(error):
            raise
        raise TrainingError(f"rank {job.rank}: a collective failed or waited more than "
                            f"parallel.timeout_s={cfg.parallel.timeout_s} s, so another rank failed or hung "
                            f"({str(error).splitlines()[0]})") from error
    finally:
        job.shutdown()
