"""Where a training job starts, from `train.resume` and what its run directory holds. A run directory holds one
run: a new run never starts beside the checkpoints or metrics of another, and a checkpoint that fails verification
is never deleted or overwritten (it is set aside, or the job stops). An earlier run is moved out of the way, to
`OUT_DIR/previous/N`, by `train.resume=restart`, and by `auto` where it left only metrics (no checkpoint)."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from moe_diff.checkpoint import training as checkpoints
from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.config import RESUME_ALLOWED, ConfigError, TrainConfig
from moe_diff.errors import literal
from moe_diff.parallel.runtime import Runtime
from moe_diff.runs import CHECKPOINTS_DIR, METRICS_FILE, PREVIOUS_DIR, RUN_FILES

DAMAGED_DIR = "damaged"  # checkpoints/damaged/step-N: checkpoints that failed verification, set aside


@dataclass(frozen=True)
class Start:
    """The checkpoint a job continues (None: a new run at step 0) and the id of the run it writes."""

    checkpoint: Path | None
    run_id: str


def plan_start(cfg: TrainConfig, console: Console, job: Runtime) -> Start:
    """Decide where the job starts, the same on every rank (the ranks share the verification; rank 0 moves files);
    a ConfigError or CheckpointError where the run directory holds something the job would mix with or lose."""
    out = Path(cfg.out_dir)
    root = out / CHECKPOINTS_DIR
    if cfg.resume == "restart":
        if job.is_main:
            set_aside_run(out, console)
        job.barrier()
        return Start(None, new_run_id(job))
    if cfg.resume == "never":
        refuse_earlier_run(out)
        return Start(None, new_run_id(job))
    if cfg.resume == "auto":
        newest, failed = checkpoints.newest_valid(root, job)
        if newest is None and failed:
            raise CheckpointError(none_verifies(out, failed))
        set_aside_damaged(failed, root, console, job)
        if newest is None:
            if job.is_main and held_run(out):  # the metrics of a run that saved no checkpoint
                set_aside_run(out, console)
            job.barrier()
            return Start(None, new_run_id(job))
        return Start(newest, continued_id(newest, out, job))
    path = Path(cfg.resume)
    if not path.is_dir():
        raise ConfigError(f"train.resume={cfg.resume!r} is not allowed: no such directory; {RESUME_ALLOWED}")
    try:
        step = checkpoints.verify_in_job(path, job)
    except CheckpointError as error:
        raise CheckpointError(f"train.resume={cfg.resume!r}: {error}") from None
    run = continued_id(path, out, job)
    refuse_other_checkpoints(cfg.resume, out, path, step, run)
    return Start(path, run)


def new_run_id(job: Runtime) -> str:
    """A fresh run id, rank 0's on every rank."""
    return job.gather_objects(uuid.uuid4().hex)[0]


def continued_id(checkpoint: Path, out: Path, job: Runtime) -> str:
    """The id of the run that continuing `checkpoint` in `out` writes: the checkpoint's; for one written before run
    ids, that earlier run's only in its own directory (elsewhere the id-less checkpoints are another run's), so a
    fresh id there."""
    run = checkpoints.run_id(checkpoint)
    at_home = checkpoint.resolve().parent == (out / CHECKPOINTS_DIR).resolve()
    return run if run is not None and (run != checkpoints.EARLIER_RUN or at_home) else new_run_id(job)


def held_run(out: Path) -> list[str]:
    """What of a run `out` holds: its checkpoints by name, else its metrics log if it has any records."""
    held = [path.name for path in checkpoints.list_checkpoints(out / CHECKPOINTS_DIR)]
    metrics = out / METRICS_FILE
    return held or ([METRICS_FILE] if metrics.is_file() and metrics.stat().st_size else [])


def refuse_earlier_run(out: Path) -> None:
    held = held_run(out)
    if held:
        raise ConfigError(f"train.resume='never' is not allowed in {out}: it holds an earlier run "
                          f"({', '.join(held)}), which a new run would mix with and delete. Give another "
                          f"train.out_dir, or train.resume=restart to move that run to {out / PREVIOUS_DIR}/N first "
                          "(nothing is deleted), or train.resume=auto to continue it")


def refuse_other_checkpoints(resume: str, out: Path, path: Path, step: int, resumed: str) -> None:
    """Refuse what continuing `path` (at `step`, as run `resumed`) in `out` would write over or mix with: a newer
    checkpoint of its run, another run's checkpoints (and so its metrics), or, where there are no checkpoints,
    another run's metrics."""
    found = [(other, checkpoints.run_id(other)) for other in checkpoints.list_checkpoints(out / CHECKPOINTS_DIR)]
    others = [f"{other.name} ({'a newer one of this run' if run == resumed else 'another run'})"
              for other, run in found if other.resolve() != path.resolve()
              and (run != resumed or checkpoints.step_of(other) > step)]
    if not found:
        others = [f"{name} (another run)" for name in held_run(out)]
    if others:
        raise ConfigError(f"train.resume={resume!r} is not allowed with train.out_dir={str(out)!r}: it holds "
                          f"{', '.join(others)}, which this run would write over or mix its metrics with. Give "
                          "this job another train.out_dir")


def none_verifies(out: Path, failed: dict[Path, str]) -> str:
    return (f"no checkpoint in {out / CHECKPOINTS_DIR} verifies, so the job neither resumes nor writes over them: "
            f"{'; '.join(failed.values())}. To resume, name a checkpoint that verifies with train.resume=PATH and "
            f"another train.out_dir; to start a new run here, train.resume=restart moves these to "
            f"{out / PREVIOUS_DIR}/N (nothing is deleted)")


def set_aside_damaged(failed: dict[Path, str], root: Path, console: Console, job: Runtime) -> None:
    """Move each checkpoint that failed verification to checkpoints/damaged/, where no save or pruning reaches."""
    if job.is_main:
        for path, reason in failed.items():
            destination = free_name(root / DAMAGED_DIR / path.name)
            destination.parent.mkdir(exist_ok=True)
            os.replace(path, destination)
            console.print(f"[yellow]set aside:[/] {literal(reason)}; moved to {literal(destination)}",
                          soft_wrap=True)
    job.barrier()


def set_aside_run(out: Path, console: Console) -> None:
    """Move the files of the run in `out` (checkpoints, metrics, traces, plots) to a new `out/previous/N`."""
    present = [name for name in RUN_FILES if (out / name).exists()]
    if present:
        numbers = [int(p.name) for p in (out / PREVIOUS_DIR).glob("*") if p.name.isdigit()]
        destination = out / PREVIOUS_DIR / str(max(numbers, default=0) + 1)
        destination.mkdir(parents=True)
        for name in present:
            os.replace(out / name, destination / name)
        console.print(f"moved the earlier run in {literal(out)} ({', '.join(present)}) to "
                      f"{literal(destination)}", soft_wrap=True)
    console.print("starting a new run at step 0")


def free_name(path: Path) -> Path:
    """`path`, or else the first of `path.1`, `path.2`, ... that does not exist."""
    candidate, number = path, 0
    while candidate.exists():
        number += 1
        candidate = path.with_name(f"{path.name}.{number}")
    return candidate
