"""Parallel layouts side by side: the training job's own step (Trainer.train_step, not logging) in each data- and
expert-parallel layout on 4 processes, this tree's code against an earlier commit's, in interleaved rounds:
seconds per step, reads of tensor values into Python per step (each one a device sync on a GPU), parameter +
gradient + AdamW bytes per rank against the layout's formula, and the bytes SHA-256 reads and the seconds of one
checkpoint save.

CPU (gloo):  python benchmarks/layouts.py                    every layout, this tree and --old, 2 rounds
CI:          python benchmarks/layouts.py --layouts ddp --no-old --rounds 1 --steps 1 --out PATH
Parameters as DTensors against the hand-split ones before them:
             python benchmarks/layouts.py --old 92d32d7 --layouts tp2 fsdp-tp2 tp2-ep2 \
                 --out benchmarks/results/parallel-dtensor-cpu.json
The all-reduce layouts run on the earlier code only: this code refuses them, DDP having measured faster in each
(benchmarks/results/parallel-layouts-cpu.json was taken at 13aff64, before the all-reduce was removed). Four
processes on 2 cores share them: step times compare layouts and versions with each other, and say nothing of
speed-up. Each rank runs with one thread.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
OLD = "49371fc"  # the commit before parallelism was declared in one plan
PROCESSES = 4
SHAPES = ["model.n_layers=4", "train.seq_len=256", "train.batch_size=16", "train.grad_accum=1",
          "train.eval_every=0", "train.sample_tokens=0", "data.val_fraction=0.05"]
DATA_ONLY = {"allreduce": "parallel.data_parallel=allreduce", "ddp": "parallel.data_parallel=ddp",
             "fsdp": "parallel.data_parallel=fsdp"}
LAYOUTS: dict[str, list[str]] = {
    **{name: [setting] for name, setting in DATA_ONLY.items()},
    **{f"{name}-ep2": [setting, "parallel.ep=2"] for name, setting in DATA_ONLY.items()},
    "hsdp": ["parallel.data_parallel=fsdp", "parallel.dp_replicate=2"],
    "tp2": ["parallel.data_parallel=ddp", "parallel.tp=2", "model.n_kv_heads=4"],
    "fsdp-tp2": ["parallel.data_parallel=fsdp", "parallel.tp=2", "model.n_kv_heads=4"],
    "tp2-ep2": ["parallel.data_parallel=ddp", "parallel.tp=2", "parallel.ep=2", "model.n_kv_heads=4"],
}


# ---- one rank (under torchrun, with the version under test first on PYTHONPATH)

def local_bytes(tensors: Iterator[torch.Tensor]) -> int:
    """Bytes of this rank's pieces (an FSDP DTensor's local shard)."""
    return sum((t.to_local() if hasattr(t, "to_local") else t).nbytes for t in tensors)


@contextlib.contextmanager
def counting_sha256() -> Iterator[list[int]]:
    """The bytes every SHA-256 made inside reads, in one list."""
    real, read = hashlib.sha256, [0]

    class Counted:
        def __init__(self, data: bytes = b""):
            self.inner = real()
            self.update(data)

        def update(self, data: bytes) -> None:
            read[0] += len(data)
            self.inner.update(data)

        def hexdigest(self) -> str:
            return self.inner.hexdigest()

    hashlib.sha256 = Counted
    try:
        yield read
    finally:
        hashlib.sha256 = real


def this_trees_counter() -> Any:
    """moe_diff/host_reads.py of this tree, loaded by path (an earlier version's package has none)."""
    spec = importlib.util.spec_from_file_location("host_reads_here", ROOT / "moe_diff" / "host_reads.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.counting_host_reads


def probe(out: Path, steps: int, overrides: list[str]) -> None:
    """Build the trainer, take two steps, count the reads of a third, time `steps` more, then one save; write
    this rank's figures to OUT/rank-R.json."""
    import torch.distributed as dist
    from rich.console import Console

    import moe_diff
    from moe_diff.config import load_config
    from moe_diff.parallel import runtime
    from moe_diff.training.trainer import Trainer

    counting_host_reads = this_trees_counter()
    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SHAPES, f"train.out_dir={out / 'run'}", *overrides])
    job = runtime.start(cfg.parallel, torch.device("cpu"))
    trainer = Trainer(cfg, Console(quiet=True), job)
    gradient_bytes, step = [0], trainer.optimizer.step

    def measured_step(*args: Any, **kwargs: Any) -> Any:
        gradient_bytes[0] = local_bytes(p.grad for p in trainer.model.parameters() if p.grad is not None)
        return step(*args, **kwargs)

    trainer.optimizer.step = measured_step
    for _ in range(2):
        trainer.train_step(details=False)
    with counting_host_reads() as reads:
        trainer.train_step(details=False)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(details=False)
    dist.barrier()
    seconds = (time.perf_counter() - start) / steps
    trainer.step = 3 + steps
    with counting_sha256() as hashed:
        start = time.perf_counter()
        trainer.save()
        save_seconds = time.perf_counter() - start
    moments = (value for state in trainer.optimizer.state.values() for value in state.values()
               if torch.is_tensor(value) and value.dim())
    record = {"package": str(Path(moe_diff.__file__).parent), "seconds_per_step": seconds, "host_reads": len(reads),
              "read_kinds": sorted(set(reads)), "parameter_bytes": local_bytes(trainer.model.parameters()),
              "gradient_bytes": gradient_bytes[0], "optimizer_bytes": local_bytes(moments),
              "sha256_bytes_per_save": hashed[0], "save_seconds": save_seconds}
    (out / f"rank-{job.rank}.json").write_text(json.dumps(record))
    job.shutdown()


# ---- the side-by-side run

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_layout(code: Path, layout: list[str], steps: int, folder: Path) -> dict[str, Any]:
    """One torchrun job of `probe` on `code`'s package: the ranks' figures combined (the slowest rank's time, the
    largest memory, every rank's reads), or why it failed."""
    folder.mkdir(parents=True)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={PROCESSES}",
               f"--master_port={free_port()}", __file__, "--probe", str(folder), "--steps", str(steps), "--", *layout]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code)}
    process = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=1200)
    if process.returncode:  # the first rank's exception, as torchrun prints it
        raised = [match[1] for line in process.stderr.splitlines()
                  if (match := re.match(r"(?:\[rank\d+\]: )?([\w.]*(Error|Exception): .*)", line))
                  and "ChildFailedError" not in line]
        return {"failed": (raised or process.stderr.splitlines()[-1:] or ["no output"])[0][:300]}
    ranks = [json.loads((folder / f"rank-{rank}.json").read_text()) for rank in range(PROCESSES)]
    if any(rank["package"] != str(code / "moe_diff") for rank in ranks):
        raise RuntimeError(f"the job imported {ranks[0]['package']}, not {code / 'moe_diff'}")
    resident = max(r["parameter_bytes"] + r["gradient_bytes"] + r["optimizer_bytes"] for r in ranks)
    return {"seconds_per_step": max(r["seconds_per_step"] for r in ranks),
            "host_reads_per_step": [r["host_reads"] for r in ranks], "read_kinds": ranks[0]["read_kinds"],
            "resident_bytes_per_rank": resident, "parameter_bytes_per_rank": max(r["parameter_bytes"] for r in ranks),
            "sha256_bytes_per_save": sum(r["sha256_bytes_per_save"] for r in ranks),
            "sha256_bytes_per_save_per_rank": max(r["sha256_bytes_per_save"] for r in ranks),
            "save_seconds": max(r["save_seconds"] for r in ranks)}


def formula_bytes(layout: list[str]) -> int | None:
    """Parameters, gradients and AdamW's two moments in float32 per rank, as the layout splits them: experts over
    ep, then everything over FSDP's ranks (HSDP: one group's); None for tensor parallelism (not counted here)."""
    from moe_diff.config import load_config
    from moe_diff.costs import param_counts

    cfg = load_config(ROOT / "configs" / "tiny.yaml", [*SHAPES, *[s for s in layout if s.startswith("model.")]])
    settings = dict(setting.split("=", 1) for setting in layout)
    if settings.get("parallel.tp", "1") != "1":
        return None
    ep, replicate = int(settings.get("parallel.ep", 1)), int(settings.get("parallel.dp_replicate", 1))
    sharded = settings.get("parallel.data_parallel") == "fsdp"
    dense_shards = PROCESSES // replicate if sharded else 1
    expert_shards = PROCESSES // (ep * replicate) if sharded else 1
    counts = param_counts(cfg.model)
    return 16 * round((counts.total - counts.experts_total) / dense_shards
                      + counts.experts_total / (ep * expert_shards))


def git_worktree(commit: str, directory: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(directory), commit], check=True,
                   capture_output=True)
    return directory


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--old", default=OLD, help="the earlier commit to compare with (default %(default)s)")
    parser.add_argument("--no-old", dest="compare", action="store_false", help="this tree only")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per job")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "parallel-layouts-cpu.json"))
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        probe(Path(args.probe), args.steps, args.overrides)
        return 0
    from moe_diff.device import environment
    from moe_diff.files import write_json

    with tempfile.TemporaryDirectory(prefix="layouts-") as scratch:
        versions = {"this": ROOT}
        if args.compare:
            versions["old"] = git_worktree(args.old, Path(scratch) / "old")
        runs: dict[str, dict[str, list[dict]]] = {layout: {v: [] for v in versions} for layout in args.layouts}
        try:
            for round_index in range(args.rounds):
                for layout in args.layouts:
                    for version, code in versions.items():
                        folder = Path(scratch) / f"{layout}-{version}-{round_index}"
                        runs[layout][version].append(run_layout(code, LAYOUTS[layout], args.steps, folder))
                        print(f"round {round_index} {layout:<14} {version:<5} {runs[layout][version][-1]}")
        finally:
            if args.compare:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(versions["old"])],
                               capture_output=True)
    rows = []
    for layout, by_version in runs.items():
        row: dict[str, Any] = {"layout": layout, "settings": LAYOUTS[layout],
                               "formula_resident_bytes_per_rank": formula_bytes(LAYOUTS[layout])}
        for version, results in by_version.items():
            done = [r for r in results if "failed" not in r]
            if not done:
                row[version] = results[-1]
                continue
            row[version] = done[-1] | {"seconds_per_step": statistics.median(r["seconds_per_step"] for r in done),
                                       "seconds_per_step_rounds": [r["seconds_per_step"] for r in done]}
        rows.append(row)
    results = {"environment": environment(torch.device("cpu")), "processes": PROCESSES, "threads_per_rank": 1,
               "config": "configs/tiny.yaml", "shapes": SHAPES, "old_commit": args.old if args.compare else None,
               "settings": vars(args) | {"probe": None}, "rows": rows}
    write_json(results, Path(args.out))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
