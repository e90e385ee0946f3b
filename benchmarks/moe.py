"""One MoE layer's forward+backward for every expert backend beside the dense GEMM floor: time, TFLOP/s, memory.

GPU (the issue's shapes):  python benchmarks/moe.py --tokens 4096 8192 16384 32768 --dtype bfloat16
CPU (what CI runs):         python benchmarks/moe.py --cpu-size
The dense floor is the same FLOPs as one plain SwiGLU of width top_k * ffn over every token: what a grouped
GEMM would cost with perfectly even, perfectly packed experts.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_diff.device import DTYPES, environment, synchronize
from moe_diff.inference.bench.measure import median_seconds
from moe_diff.inference.bench.report import write_json
from moe_diff.kernels.moe_experts import (
    megablocks_available,
    moe_experts_grouped_mm,
    moe_experts_megablocks,
    moe_experts_reference,
)

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what every backend runs


def dense_floor(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """A SwiGLU of width K*F over all N tokens: the FLOPs of the routed layer in three plain GEMMs."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def backends(device: torch.device) -> dict[str, Callable[..., torch.Tensor]]:
    available = {"reference": moe_experts_reference, "grouped_mm": moe_experts_grouped_mm}
    if megablocks_available() and device.type == "cuda":
        available["megablocks"] = moe_experts_megablocks
    return available


def timed(step: Callable[[], None], device: torch.device, repeats: int) -> tuple[float, int | None]:
    """Median seconds of `step` after two warm-up calls, and its peak extra CUDA memory in bytes."""
    step()
    step()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    seconds = median_seconds(step, device, repeats, warmup=0)
    peak = torch.cuda.max_memory_allocated() - base if device.type == "cuda" else None
    return seconds, peak


def measure(n_tokens: int, dim: int, ffn: int, n_experts: int, top_k: int, dtype: torch.dtype,
            device: torch.device, repeats: int) -> list[dict]:
    """Every backend and the dense floor on the same tokens, routing and weights."""
    generator = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n_tokens, dim, device=device, dtype=dtype, generator=generator)
    weights_shape = {"w1": (n_experts, ffn, dim), "w2": (n_experts, dim, ffn), "w3": (n_experts, ffn, dim)}
    w = {k: (torch.randn(s, device=device, dtype=dtype, generator=generator) / dim ** 0.5).requires_grad_()
         for k, s in weights_shape.items()}
    router = torch.randn(n_tokens, n_experts, device=device, generator=generator).softmax(-1)
    top, expert_ids = router.topk(top_k, dim=-1)
    routing_weights = (top / top.sum(-1, keepdim=True)).to(dtype)
    dense = {k: (torch.randn(s, device=device, dtype=dtype, generator=generator) / dim ** 0.5).requires_grad_()
             for k, s in {"w1": (top_k * ffn, dim), "w2": (dim, top_k * ffn), "w3": (top_k * ffn, dim)}.items()}
    inputs = x.requires_grad_()
    flops = 3 * 2 * n_tokens * top_k * 3 * dim * ffn  # forward + backward (2x), three matmuls per expert
    rows = []
    cases = {name: (lambda op=op: op(inputs, expert_ids, routing_weights, w["w1"], w["w2"], w["w3"]))
             for name, op in backends(device).items()}
    cases["dense floor"] = lambda: dense_floor(inputs, dense["w1"], dense["w2"], dense["w3"])
    for name, forward in cases.items():
        def step(forward: Callable[[], torch.Tensor] = forward) -> None:
            forward().float().square().mean().backward()
        seconds, peak = timed(step, device, repeats)
        rows.append({"backend": name, "tokens": n_tokens, "seconds": seconds, "tflops": flops / seconds / 1e12,
                     "peak_memory_bytes": peak})
    floor = next(r["seconds"] for r in rows if r["backend"] == "dense floor")
    for row in rows:
        row["time_over_dense_floor"] = row["seconds"] / floor
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--ffn", type=int, default=14336)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-size", action="store_true",
                        help="a size that runs in seconds on a CPU: dim 256, ffn 512, 512-2048 tokens, float32")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.dim, args.ffn, args.tokens, args.dtype, args.device = 256, 512, [512, 2048], "float32", "cpu"
    if min(args.tokens) < 1 or args.repeats < 1 or not 1 <= args.top_k <= args.experts:
        parser.error("--tokens and --repeats must be positive and --top-k within 1..--experts")
    device = torch.device(args.device)
    rows = [row for n in args.tokens
            for row in measure(n, args.dim, args.ffn, args.experts, args.top_k, DTYPES[args.dtype], device,
                               args.repeats)]
    results = {"environment": environment(device), "dim": args.dim, "ffn": args.ffn, "experts": args.experts,
               "top_k": args.top_k, "dtype": args.dtype, "results": rows}
    out = write_json(results, Path(args.out or Path(__file__).parent / "results" / f"moe-{device.type}.json"))
    for row in rows:
        print(f"{row['tokens']:>6} tokens  {row['backend']:<12} {row['seconds'] * 1e3:9.2f} ms  "
              f"{row['tflops']:8.3f} TFLOP/s  {row['time_over_dense_floor']:5.2f}x the dense floor")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
