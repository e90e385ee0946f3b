"""The one command to run whenever a GPU is available: the GPU benchmarks and tests as stages in priority order,
each within its own time budget, with every stage's results written as soon as it ends.

    python benchmarks/gpu_suite.py --budget 450 --out OUT        a GPU: the figures the README reports
    python benchmarks/gpu_suite.py --cpu-size --out OUT          every stage at a tiny size (what CI runs)

Under OUT (at most eight files): <gpu>-<stage>.json per stage (the stage's own results, each with the device,
versions, commit and shapes, and how the stage ran), gpu-summary.json (read it first: per stage its status, its
headline ratios and whether each target holds) and gpu-logs.tar.gz (each stage's log and the other files it
wrote). The committed copies go to benchmarks/results/. Stages run as child processes, so one that fails or
overruns (it is stopped at 1.5x its budget) leaves the others theirs; a stage that would not fit in what is left
of --budget is not started.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
OVERRUN = 1.5  # a stage is stopped at this multiple of its budget
GRACE_S = 20  # seconds an interrupted command has to write what it measured
GPU_NAMES = ("H200", "H100", "B200", "A100", "L40S", "A10G", "L4")  # short names for the file names


@dataclass(frozen=True)
class Stage:
    """A stage: its budget in seconds on a GPU, the commands it runs (each writes a JSON part under the stage's
    folder; given the folder and whether the run is CPU-sized), and its headline ratios from those parts."""

    name: str
    budget_s: float
    commands: Callable[[Path, bool, float], dict[str, list[str]]]
    headlines: Callable[[dict[str, Any]], list[dict[str, Any]]]
    env: dict[str, str] | None = None
    needs_gpus: int = 0  # on a GPU machine, not started with fewer (it runs at --cpu-size, skipping its tests)


def headline(name: str, value: float | None, target: str, holds: bool | None) -> dict[str, Any]:
    """One headline: a measured ratio (None where not measured), the target it is held to, and whether it holds."""
    return {"name": name, "value": value, "target": target, "holds": holds}


def at_least(name: str, value: float | None, bound: float) -> dict[str, Any]:
    return headline(name, value, f">= {bound:g}", None if value is None else value >= bound)


def at_most(name: str, value: float | None, bound: float) -> dict[str, Any]:
    return headline(name, value, f"<= {bound:g}", None if value is None else value <= bound)


# ---- train-step: whole-model training steps (benchmarks/train_step.py)

def train_step_commands(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
    size = ["--cpu-size"] if cpu_size else ["--compile", "--budget", f"{budget_s:.0f}"]
    return {"train-step": [PYTHON, "benchmarks/train_step.py", *size, "--out", str(folder / "train-step.json")]}


def train_step_headlines(parts: dict[str, Any]) -> list[dict[str, Any]]:
    results = parts["train-step"]
    found = []
    for name, value in results.get("ratios", {}).items():
        bound = 1.3 if "transformers" in name else 0.95
        found.append(at_least(f"tokens/s {name}", value, bound))
    for row in results["rows"]:
        if row["system"] != "transformers" and not row["system"].startswith("transformers "):
            found.append(at_least(f"MFU {row['system']}", row["mfu"], 0.40))
    return found


# ---- attention: the differential kernel against every alternative (benchmarks/attention.py)

ALTERNATIVES = {"diff": ("diff / sdpa", "diff / sdpa 4 calls", "diff / flex"),
                "diff_v2": ("diff_v2 / sdpa", "diff_v2 / flex")}


def attention_commands(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
    script = [PYTHON, "benchmarks/attention.py"]
    if cpu_size:
        return {"no-window": script + ["--cpu-size", "--repeats", "1", "--out", str(folder / "no-window.json")],
                "window": script + ["--cpu-size", "--repeats", "1", "--window", "64",
                                    "--out", str(folder / "window.json")]}
    return {"no-window": script + ["--seq", "4096", "16384", "--out", str(folder / "no-window.json")],
            "window": script + ["--seq", "16384", "32768", "--window", "4096", "--out", str(folder / "window.json")]}


def attention_headlines(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Per mode, regime and length: the Triton kernel's forward+backward time over the fastest alternative's
    (targets 1.0 without a window, 0.9 with one), and diff's over the standard-attention yardstick (stretch 1.5)."""
    found = []
    for regime, bound in (("no-window", 1.0), ("window", 0.9)):
        if regime not in parts:  # stopped before it was written
            continue
        rows = [row for row in parts[regime]["results"] if "error" not in row]
        for seq in sorted({row["seq"] for row in rows}):
            times = {row["case"]: row["forward_backward_s"] for row in rows if row["seq"] == seq}
            for mode, alternatives in ALTERNATIVES.items():
                kernel = times.get(f"{mode} / triton")
                fastest = min((times[name] for name in alternatives if name in times), default=None)
                ratio = kernel / fastest if kernel is not None and fastest else None
                found.append(at_most(f"{mode} kernel / fastest alternative, {regime}, seq {seq}", ratio, bound))
            yardstick = times.get("standard 2x heads / sdpa (yardstick)")
            kernel = times.get("diff / triton")
            ratio = kernel / yardstick if kernel is not None and yardstick else None
            found.append(at_most(f"diff kernel / standard yardstick, {regime}, seq {seq} (stretch)", ratio, 1.5))
    return found


# ---- decode: moe-diff bench beside transformers

def decode_commands(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
    bench = [PYTHON, "-m", "moe_diff.cli", "bench"]
    if cpu_size:
        return {"decode": bench + ["configs/bench-13m.yaml", "model.n_layers=1", "--batch", "1", "--prompt", "16",
                                   "--new-tokens", "8", "--repeats", "1", "--systems", "moe-diff", "transformers",
                                   "--out", str(folder / "decode")]}
    return {"decode": bench + ["configs/bench-mixtral-4l.yaml", "--dtype", "bfloat16", "--compile", "--routing",
                               "uniform", "--batch", "1", "16", "--systems", "moe-diff", "transformers", "--out",
                               str(folder / "decode")]}


def decode_headlines(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """At batch 1, per prompt length, for moe-diff's compiled decode steps (its eager ones at the CPU size): the share
    of the measured bandwidth a decode step reads (target 0.70) and the decode speed-up over transformers (target
    3)."""
    results, found = parts["decode"], []
    ours = "moe-diff compiled" if results["settings"]["compile"] else "moe-diff"
    for run in results["runs"]:
        if run["system"] == ours and run["batch"] == 1:
            found.append(at_least(f"batch-1 decode bandwidth share, prompt {run['prompt_length']}",
                                  run["bandwidth_share"], 0.70))
    for row in results["speedups"]:
        if row["system"] == ours and row["versus"] == "transformers" and row["batch"] == 1:
            found.append(at_least(f"batch-1 decode speed-up over transformers, prompt {row['prompt_length']}",
                                  row["decode"], 3.0))
    return found


# ---- moe: one MoE layer at Mixtral-8x7B's shape (benchmarks/moe.py)

def moe_commands(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
    size = ["--cpu-size", "--repeats", "1"] if cpu_size else ["--tokens", "1", "16", "4096", "16384"]
    return {"moe": [PYTHON, "benchmarks/moe.py", *size, "--out", str(folder / "moe.json")]}


def moe_headlines(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """grouped_mm's forward+backward over the dense floor at the fewest tokens of 4096 or more (target 1.15 at 4K),
    and MegaBlocks' (its grouped GEMM in this project's layer, and its own dMoE layer) where they ran."""
    rows = [row for row in parts["moe"]["results"] if row["pass"] == "forward+backward"]
    large = [row["tokens"] for row in rows if row["tokens"] >= 4096]
    tokens = min(large) if large else max(row["tokens"] for row in rows)
    found = []
    for backend in ("grouped_mm", "megablocks", "megablocks dMoE layer"):
        ratio = next((row["time_over_dense_floor"] for row in rows
                      if row["backend"] == backend and row["tokens"] == tokens), None)
        name = f"{backend} / dense floor, forward+backward, {tokens} tokens"
        if backend == "megablocks dMoE layer":  # its own router included: beside the others, no target
            found += [headline(name, ratio, "none (router included)", None)] if ratio is not None else []
        elif ratio is not None or backend == "grouped_mm":
            found.append(at_most(name, ratio, 1.15))
    return found


# ---- tests and multi-gpu: the GPU tests, the compiled Triton kernel tests, and the NCCL parity tests

def pytest_commands(name: str, gpu_paths: list[str], cpu_paths: list[str],
                    compile_figures: bool = False) -> Callable[..., dict[str, list[str]]]:
    """A stage that runs pytest on these paths (fewer at --cpu-size) and keeps its JUnit report as the part; with
    `compile_figures`, then every attention launch candidate's Hopper figures from this machine's Triton (the
    tests just compiled them into its cache; at --cpu-size one kernel's)."""
    def commands(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
        found = {name: [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        *(cpu_paths if cpu_size else gpu_paths), "--junitxml", str(folder / f"{name}.xml")]}
        if compile_figures:
            which = ["--mode", "diff_v2", "--kernel", "forward"] if cpu_size else []
            found["compile"] = [PYTHON, "-m", "moe_diff.kernels.gpu_compile", "--candidates", "--head-dim", "128",
                                *which, "--out", str(folder / "compile.json")]
        return found
    return commands


def junit_counts(path: Path) -> dict[str, Any]:
    """Counts and the failing tests' names from a pytest JUnit XML report."""
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0, "failing": []}
    for case in cases:
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        key = {"failure": "failed", "error": "failed"}.get(outcome, outcome)
        counts[key] += 1
        if key == "failed":
            counts["failing"].append(f"{case.get('classname')}::{case.get('name')}")
    return counts


def pytest_headlines(name: str) -> Callable[[dict[str, Any]], list[dict[str, Any]]]:
    """Failed (target 0), passed and skipped counts of a pytest stage, and the compile figures' spills."""
    def headlines(parts: dict[str, Any]) -> list[dict[str, Any]]:
        found = []
        if (counts := parts.get(name)) is not None:
            found += [headline(f"{name} failed", counts["failed"], "0", counts["failed"] == 0),
                      headline(f"{name} passed", counts["passed"], "all that apply", None),
                      headline(f"{name} skipped", counts["skipped"], "none where they apply", None)]
        figures = parts.get("compile", {})
        for row in figures.get("rows", []):
            if "stack_bytes" in row:
                found.append(at_most(f"{row['mode']} {row['kernel']} {tuple(row['launch'])} spill bytes/thread "
                                     f"(Triton {figures['triton']})", row["stack_bytes"], 64))
        return found
    return headlines


STAGES = [
    Stage("train-step", 120, train_step_commands, train_step_headlines),
    Stage("attention", 120, attention_commands, attention_headlines),
    Stage("decode", 90, decode_commands, decode_headlines),
    Stage("moe", 60, moe_commands, moe_headlines),
    Stage("tests", 60, pytest_commands("tests", ["tests/test_gpu.py", "tests/kernels"], ["tests/test_gpu.py"],
                                       compile_figures=True),
          pytest_headlines("tests"), env={"TRITON_INTERPRET": "0"}),
    Stage("multi-gpu", 60, pytest_commands("multi-gpu", ["tests/parallel/test_nccl.py"],
                                           ["tests/parallel/test_nccl.py"]), pytest_headlines("multi-gpu"),
          needs_gpus=2),
]
CPU_BUDGET_S = 120  # each stage's budget at --cpu-size


REQUIRED = ("torch", "omegaconf", "yaml", "rich", "safetensors", "matplotlib", "numpy")  # the package's needs


def missing_packages() -> list[str]:
    """The packages the project needs that this machine lacks (a GPU machine without an index may)."""
    return [name for name in REQUIRED if importlib.util.find_spec(name) is None]


def device_label() -> tuple[str, dict[str, Any]]:
    """A short name of the device for file names ('h200', 'cpu') and the environment stored with the results."""
    import torch

    from moe_diff.device import environment

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    env = environment(device) | {"gpu_count": torch.cuda.device_count()}
    name = env["device_name"] if device.type == "cuda" else "cpu"
    short = next((gpu for gpu in GPU_NAMES if gpu in name), name)
    return re.sub(r"[^a-z0-9]+", "-", short.lower()).strip("-"), env


def read_parts(folder: Path, names: list[str]) -> tuple[dict[str, Any], dict[str, str]]:
    """Each command's part that exists (its JSON, or its JUnit report read into counts), and why any that exists
    could not be read (a command stopped while writing it)."""
    parts, unreadable = {}, {}
    for name in names:
        path, report = folder / f"{name}.json", folder / f"{name}.xml"
        try:
            if report.is_file():
                parts[name] = junit_counts(report)
            elif path.is_file():
                parts[name] = json.loads(path.read_text())
        except (ValueError, ElementTree.ParseError) as error:
            unreadable[name] = f"{type(error).__name__}: {error}"
    return parts, unreadable


def run_command(argv: list[str], env: dict[str, str], out: IO[str], timeout: float) -> int | None:
    """Run one command in its own process group; past `timeout`, interrupt the whole group (so pytest still writes
    its report and torchrun its workers stop), then kill what is left. Its exit code, or None if it was stopped."""
    process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        return None


def run_stage(stage: Stage, folder: Path, cpu_size: bool, budget_s: float, log: Path) -> dict[str, Any]:
    """Run the stage's commands one after another within OVERRUN x its budget; its record and its parts."""
    folder.mkdir(parents=True, exist_ok=True)
    commands = stage.commands(folder, cpu_size, budget_s)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", **(stage.env or {})}
    deadline = time.monotonic() + OVERRUN * budget_s
    status, failures = "ok", []
    with log.open("w") as out:
        for name, argv in commands.items():
            out.write(f"$ {' '.join(argv)}\n")
            out.flush()
            code = run_command(argv, env, out, max(1.0, deadline - time.monotonic()))
            if code is None:
                status = f"stopped after {OVERRUN * budget_s:.0f} s (1.5x its budget) in {name}"
                break
            if code != 0:
                failures.append(f"{name} exited with {code}")
    if failures and status == "ok":
        status = "; ".join(failures) + f" (see {log.name} in the logs)"
    parts, unreadable = read_parts(folder, list(commands))
    record = {"status": status, "commands": {name: argv[1:] for name, argv in commands.items()}, "parts": parts}
    return record | ({"unreadable_parts": unreadable} if unreadable else {})


def stage_summary(stage: Stage, record: dict[str, Any]) -> dict[str, Any]:
    """The stage's line in the summary: status, time, and its headlines from whatever parts it left."""
    summary = {key: record[key] for key in ("stage", "status", "seconds", "budget_s", "file") if key in record}
    try:
        summary["headlines"] = stage.headlines(record["parts"]) if record.get("parts") else []
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:  # a part cut short by a stop
        summary["headlines"] = []
        summary["headline_error"] = f"{type(error).__name__}: {error}"
    return summary


def write_logs(out: Path, logs: Path) -> None:
    """gpu-logs.tar.gz: every stage's log and the other files the stages wrote."""
    with tarfile.open(out / "gpu-logs.tar.gz", "w:gz") as archive:
        archive.add(logs, arcname="logs")


def main(argv: list[str] | None = None) -> int:
    names = [stage.name for stage in STAGES]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for the results (at most eight files)")
    parser.add_argument("--stages", nargs="+", choices=names, default=names, help="stages to run, in this order")
    parser.add_argument("--budget", type=float, default=450, help="seconds in all: a stage that would not fit in "
                        "what is left is not started")
    parser.add_argument("--work", default=None, help="folder for the logs and the stages' files before they are "
                        "packed (default: a new temporary folder)")
    parser.add_argument("--cpu-size", action="store_true", help=f"every stage at a tiny size, {CPU_BUDGET_S} s each")
    args = parser.parse_args(argv)
    if args.budget <= 0:
        parser.error("--budget must be positive")
    if missing := missing_packages():
        print(f"error: this Python lacks {', '.join(missing)}, which the project needs: carry wheels and install them "
              "first (docs/gpu.md, 'On a GPU machine without a package index')", file=sys.stderr)
        return 2
    started = time.monotonic()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.work or tempfile.mkdtemp(prefix="gpu-suite-"))  # outside OUT, which returns few files
    logs.mkdir(parents=True, exist_ok=True)
    label, env = device_label()
    summary: dict[str, Any] = {"environment": env, "budget_s": args.budget, "stages": []}
    for stage in (stage for stage in STAGES if stage.name in args.stages):
        budget_s = CPU_BUDGET_S if args.cpu_size else stage.budget_s
        left = args.budget - (time.monotonic() - started)
        record: dict[str, Any] = {"stage": stage.name, "budget_s": budget_s}
        if not args.cpu_size and env["gpu_count"] < stage.needs_gpus:
            record |= {"status": f"not started: it needs {stage.needs_gpus} GPUs, this machine has {env['gpu_count']}"}
        elif left < budget_s:
            record |= {"status": f"not started: its {budget_s:.0f} s budget does not fit in the {left:.0f} s left"}
        else:
            began = time.monotonic()
            record |= run_stage(stage, logs / stage.name, args.cpu_size, budget_s, logs / f"{stage.name}.log")
            record["seconds"] = round(time.monotonic() - began, 1)
            record["file"] = f"{label}-{stage.name}.json"
            (out / record["file"]).write_text(json.dumps(record | {"environment": env}, indent=2) + "\n")
        summary["stages"].append(stage_summary(stage, record))
        summary["elapsed_s"] = round(time.monotonic() - started, 1)
        (out / "gpu-summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        write_logs(out, logs)
        print(f"{stage.name:<11} {record['status']}")
        for line in summary["stages"][-1]["headlines"]:
            value = "not measured" if line["value"] is None else f"{line['value']:.3g}"
            verdict = {True: "holds", False: "misses", None: ""}[line["holds"]]
            print(f"    {line['name']:<64} {value:>12}  target {line['target']:<14} {verdict}")
    print(f"wrote {out} in {time.monotonic() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
