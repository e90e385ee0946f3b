"""Launch configurations of the Triton attention kernels compared, one kernel at a time with the others at their
hand-picked launches, so that the candidates a GPU's autotuning chooses from (CANDIDATES in
moe_diff/kernels/diff_flash_attention.py) follow measurements.

Wherever Triton's NVIDIA backend is installed, a GPU or not, each candidate is compiled for Hopper (sm_90a) and
its registers, spills and shared memory recorded. On a GPU each candidate is also timed: a pool of processes
compiles them all first (into Triton's cache, at a shorter length that compiles the same kernels), then they run
one after another, the forward kernel in a training forward (which stores what the backward needs) and each
backward kernel in a backward call (both backward kernels run; the other one keeps its default).

GPU:  python benchmarks/attention_blocks.py --seq 16384 [--window 4096] [--modes diff]
CPU:  python benchmarks/attention_blocks.py --cpu-size   (compiles two candidates of one kernel for sm_90a;
      under TRITON_INTERPRET=1, as CI runs it, also runs the timing code on the interpreter at a tiny size,
      where the launch parameters do not apply and the times mean nothing)
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from attention import mode_inputs as attention_inputs  # benchmarks/attention.py, beside this script

from moe_diff.device import environment, synchronize
from moe_diff.files import write_json
from moe_diff.inference.bench.measure import median_seconds
from moe_diff.kernels import attention_op
from moe_diff.kernels import diff_flash_attention as flash
from moe_diff.kernels.gpu_compile import compile_in_process, error_line, hand_picked, wide_values
from moe_diff.kernels.mask import AttentionMask

Launch = flash.LaunchParams  # BLOCK_M, BLOCK_N, num_warps, num_stages[, VALUE_SPLITS]
GRID = list(itertools.product((32, 64, 128), (32, 64, 128), (4, 8), (2, 3)))


def launch_value(text: str) -> Launch:
    """BLOCK_M,BLOCK_N,WARPS,STAGES[,VALUE_SPLITS] from the command line."""
    values = tuple(int(part) for part in text.split(","))
    if len(values) not in (4, 5) or min(values) < 1:
        raise argparse.ArgumentTypeError(f"a launch is BLOCK_M,BLOCK_N,WARPS,STAGES (4 positive integers, and "
                                         f"VALUE_SPLITS for the forward kernel), got {text!r}")
    return values


def compiled_resources(launch: Launch, args: argparse.Namespace) -> list[dict]:
    """Hopper registers, spills and shared memory of every chosen kernel at `launch`, compiled in a process."""
    command = ["--mode", *args.modes, "--kernel", *args.kernels, "--head-dim", str(args.head_dim), "--dtype",
               args.dtype, "--launch", *map(str, launch)]
    try:
        return compile_in_process(command, timeout=1800)
    except (RuntimeError, subprocess.TimeoutExpired) as error:
        reason = error_line(error)  # this Triton cannot compile ahead, or took too long: every row says why
    return [{"mode": mode, "kernel": kernel, "error": reason}
            for mode, kernel in itertools.product(args.modes, args.kernels)]


def trained_inputs(mode: str, args: argparse.Namespace, device: torch.device, tokens: int) -> list[torch.Tensor]:
    """The attention benchmark's inputs of one mode, all trained, as in a training step."""
    inputs = attention_inputs(mode, args.batch, tokens, args.heads, args.kv_heads, args.head_dim,
                              getattr(torch, args.dtype), device)
    return [tensor.requires_grad_() for tensor in inputs]


def warm_tokens(seq: int) -> int:
    """A length that compiles the same kernels as `seq` (Triton specialises lengths by divisibility by 16) in
    far less memory, for the processes that fill the cache."""
    return min(seq, 1024 + seq % 16)


def run_kernel(mode: str, kernel: str, inputs: list[torch.Tensor], window: int | None) -> Callable[[], object]:
    """A call that runs `kernel`: a training forward (it keeps what the backward needs), or a backward through a
    kept graph."""
    op = attention_op("triton", mode)
    if kernel == "forward":
        return lambda: op(*inputs, AttentionMask(window))
    out = op(*inputs, AttentionMask(window))
    grad = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True)


def with_launch(mode: str, kernel: str, launch: Launch, args: argparse.Namespace,
                work: Callable[[], object]) -> object:
    """`work()` with `launch` the one candidate of this kernel and mode and the mode's other kernels at their
    hand-picked launches (no autotuning), then the autotuned kernels restored."""
    saved = dict(flash.TUNED)
    wide = wide_values(mode, args.head_dim)
    for other in flash.KERNELS:
        chosen = launch if other == kernel else hand_picked(other, mode, args.head_dim)
        flash.TUNED[other, mode, wide] = flash.tuned(other, (chosen,))
    try:
        return work()
    finally:
        flash.TUNED.update(saved)


def warm(task: tuple[str, str, Launch, argparse.Namespace]) -> str | None:
    """In a pool process: compile one candidate by running it once (Triton caches it on disk); its error, if any."""
    mode, kernel, launch, args = task
    device = torch.device(args.device)
    try:
        inputs = trained_inputs(mode, args, device, warm_tokens(args.seq))
        with_launch(mode, kernel, launch, args, lambda: run_kernel(mode, kernel, inputs, args.window)())
        synchronize(device)
        return None
    except Exception as error:  # noqa: BLE001 - a launch that does not fit (shared memory) is a result
        return error_line(error)


def timed(rows: list[dict], args: argparse.Namespace) -> None:
    """Compile every candidate in a pool of processes, then time them one at a time (filling `seconds`)."""
    device = torch.device(args.device)
    tasks = [(row["mode"], row["kernel"], tuple(row["launch"]), args) for row in rows]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        errors = pool.map(warm, tasks, chunksize=1)
    for mode in args.modes:
        inputs = trained_inputs(mode, args, device, args.seq)
        for row, error in zip(rows, errors, strict=True):
            if row["mode"] != mode:
                continue
            if error is not None:
                row["run_error"] = error
                continue
            try:
                work = run_kernel(mode, row["kernel"], inputs, args.window)  # a backward's forward: the default
                row["seconds"] = with_launch(mode, row["kernel"], tuple(row["launch"]), args,
                                             lambda work=work: median_seconds(work, device, args.repeats))
            except (RuntimeError, ValueError) as error:  # out of memory here, say: the other rows go on
                row["run_error"] = error_line(error)
            finally:
                work = None  # frees a backward's graph before the next row builds its own
        del inputs
        if device.type == "cuda":
            torch.cuda.empty_cache()


def best_launches(rows: list[dict]) -> dict[str, dict]:
    """Per mode and kernel: the fastest candidate and its time over the default's."""
    best = {}
    for (mode, kernel), group in itertools.groupby(rows, key=lambda row: (row["mode"], row["kernel"])):
        group = [row for row in group if "seconds" in row]
        default = next((row for row in group if row["default"]), None)
        if group and default is not None:
            fastest = min(group, key=lambda row: row["seconds"])
            best[f"{mode} / {kernel}"] = {"launch": fastest["launch"], "default": default["launch"],
                                          "time_over_default": fastest["seconds"] / default["seconds"]}
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", nargs="+", choices=flash.MODES, default=list(flash.MODES))
    parser.add_argument("--kernels", nargs="+", choices=list(flash.KERNELS), default=list(flash.KERNELS))
    parser.add_argument("--seq", type=int, default=16384)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="differential heads (V1); V2 and standard use 2x")
    parser.add_argument("--kv-heads", type=int, default=4, help="kv groups (V1)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=min(16, len(os.sched_getaffinity(0))),
                        help="processes that compile")
    parser.add_argument("--launches", nargs="+", type=launch_value, default=GRID, metavar="M,N,WARPS,STAGES",
                        help="candidates besides each kernel's default (default: a grid of 36)")
    parser.add_argument("--static", action=argparse.BooleanOptionalAction, default=True,
                        help="compile each candidate for sm_90a and record registers, spills, shared memory")
    parser.add_argument("--cpu-size", action="store_true",
                        help="diff_v2's forward, its default and one more; 48 tokens of 2 heads, 2 workers")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-blocks-DEVICE"
                                                     ".json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.modes, args.kernels, args.launches = ["diff_v2"], ["forward"], [(64, 64, 4, 2)]
        args.seq, args.heads, args.kv_heads, args.repeats, args.workers, args.device = 48, 2, 1, 1, 2, "cpu"
    candidates = args.launches
    if args.heads % args.kv_heads or min(args.seq, args.repeats, args.workers) < 1:
        parser.error("--kv-heads must divide --heads; --seq, --repeats and --workers must be positive")
    device = torch.device(args.device)
    launches = list(dict.fromkeys(launch for mode, kernel in itertools.product(args.modes, args.kernels)
                                  for launch in [hand_picked(kernel, mode, args.head_dim), *candidates]))
    compiled = {}
    if args.static:
        with ThreadPoolExecutor(args.workers) as pool:
            compiled = dict(zip(launches, pool.map(lambda launch: compiled_resources(launch, args), launches),
                                strict=True))
    rows = []
    for mode, kernel in itertools.product(args.modes, args.kernels):
        default = hand_picked(kernel, mode, args.head_dim)
        for launch in dict.fromkeys([default, *candidates]):
            static = next((row for row in compiled.get(launch, []) if (row["mode"], row["kernel"]) == (mode, kernel)),
                          {})
            rows.append({"mode": mode, "kernel": kernel, "launch": list(launch), "default": launch == default,
                         **{name: value for name, value in static.items()
                            if name in ("registers", "stack_bytes", "shared_bytes", "tensor_core_op", "error")}})
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":  # interpreted: CI runs the code
        timed(rows, args)
    results = {"environment": environment(device), "settings": vars(args),
               "compiled_for": "sm_90a" if args.static else None,
               "results": rows, "best": best_launches(rows)}
    out = write_json(results, Path(args.out or Path(__file__).parent / "results" /
                                   f"attention-blocks-{device.type}.json"))
    for row in rows:
        static = row.get("error") or (f"{row['registers']:>3} regs {row['stack_bytes']:>5} B stack "
                                      f"{row['shared_bytes'] // 1024:>4} KiB shared" if "registers" in row else "")
        time = (f"{row['seconds'] * 1e3:9.3f} ms" if "seconds" in row else row.get("run_error", ""))
        print(f"{row['mode']:<8} {row['kernel']:<11} {str(tuple(row['launch'])):<20}"
              f"{'*' if row['default'] else ' '} {static}  {time}")
    for name, choice in results["best"].items():
        print(f"best {name}: {tuple(choice['launch'])} ({choice['time_over_default']:.2f}x the default's time)")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
