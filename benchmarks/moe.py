"""One MoE layer for every expert backend beside the dense GEMM floor, forward and backward (training) and forward
alone (inference, no autograd): time, TFLOP/s, memory.

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
from moe_diff.files import write_json
from moe_diff.inference.bench.measure import median_seconds
from moe_diff.kernels.moe_decode import moe_experts_gemv
from moe_diff.kernels.moe_experts import (
    megablocks_available,
    moe_experts_auto,
    moe_experts_grouped_mm,
    moe_experts_megablocks,
    moe_experts_pairs,
    moe_experts_reference,
    moe_experts_sorted,
)
from moe_diff.kernels.triton_compat import HAVE_TRITON

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what every backend runs
DECODE_TOKENS = 16  # the most tokens the decode-only paths are timed at (pair by pair, the GPU's gemv kernels)


def dense_floor(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """A SwiGLU of width K*F over all N tokens: the FLOPs of the routed layer in three plain GEMMs."""
    return F.linear(F.silu(F.linear(x, w1)) * F.linear(x, w3), w2)


def backends(device: torch.device, n_tokens: int) -> dict[str, Callable[..., torch.Tensor]]:
    available = {"reference": moe_experts_reference, "grouped_mm": moe_experts_grouped_mm, "sorted": moe_experts_sorted,
                 "auto": moe_experts_auto}
    if n_tokens <= DECODE_TOKENS:
        available["pairs"] = moe_experts_pairs
    if megablocks_available() and device.type == "cuda":
        available["megablocks"] = moe_experts_megablocks
    if n_tokens <= DECODE_TOKENS and device.type == "cuda" and HAVE_TRITON:
        available["gemv"] = moe_experts_gemv  # the compiled decode step's kernels: inference only
    return available


INFERENCE_ONLY = {"gemv"}


def megablocks_dmoe(dim: int, ffn: int, n_experts: int, top_k: int, dtype: torch.dtype,
                    device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """MegaBlocks' own dropless MoE layer (its own router and routing, grouped SwiGLU experts, no biases, no
    load-balancing loss kept) at the same shape, where megablocks itself is installed on a CUDA machine; None
    elsewhere. Its time includes its router, so it is beside the others, not held to their target."""
    if device.type != "cuda":
        return None
    try:
        from megablocks.layers.arguments import Arguments
        from megablocks.layers.dmoe import dMoE
    except ImportError:
        return None
    args = Arguments(hidden_size=dim, ffn_hidden_size=ffn, moe_num_experts=n_experts, moe_top_k=top_k,
                     moe_normalize_expert_weights=1, moe_loss_weight=0.0, mlp_type="glu", mlp_impl="grouped",
                     activation_fn=F.silu,
                     bias=False, return_bias=False, fp16=dtype == torch.float16, bf16=dtype == torch.bfloat16,
                     device=device)
    layer = dMoE(args)
    return lambda x: layer(x[:, None, :])  # MegaBlocks takes [sequence, batch, hidden]


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


PASSES = ("forward+backward", "forward")  # training, and inference (no autograd)


def measure(n_tokens: int, dim: int, ffn: int, n_experts: int, top_k: int, dtype: torch.dtype,
            device: torch.device, repeats: int, passes: tuple[str, ...] = PASSES) -> list[dict]:
    """Every backend and the dense floor on the same tokens, routing and weights, for each pass."""
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
    forward_flops = 2 * n_tokens * top_k * 3 * dim * ffn  # three matmuls per chosen expert
    cases = {name: (lambda op=op: op(inputs, expert_ids, routing_weights, w["w1"], w["w2"], w["w3"]))
             for name, op in backends(device, n_tokens).items()}
    dmoe = megablocks_dmoe(dim, ffn, n_experts, top_k, dtype, device)
    if dmoe is not None:
        cases["megablocks dMoE layer"] = lambda: dmoe(inputs)
    cases["dense floor"] = lambda: dense_floor(inputs, dense["w1"], dense["w2"], dense["w3"])
    rows = []
    for kind in passes:
        timed_rows = []
        for name, forward in cases.items():
            if kind == "forward+backward" and name in INFERENCE_ONLY:
                continue
            if kind == "forward":
                def step(forward: Callable[[], torch.Tensor] = forward) -> None:
                    with torch.no_grad():
                        forward()
            else:
                def step(forward: Callable[[], torch.Tensor] = forward) -> None:
                    forward().float().square().mean().backward()
            seconds, peak = timed(step, device, repeats)
            flops = forward_flops * (3 if kind == "forward+backward" else 1)  # the backward costs two forwards
            timed_rows.append({"backend": name, "pass": kind, "tokens": n_tokens, "seconds": seconds,
                               "tflops": flops / seconds / 1e12, "peak_memory_bytes": peak})
        floor = next(r["seconds"] for r in timed_rows if r["backend"] == "dense floor")
        rows += [row | {"time_over_dense_floor": row["seconds"] / floor} for row in timed_rows]
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
                        help="a size that runs in seconds on a CPU: dim 256, ffn 512, 1-2048 tokens, float32")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/moe-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.dim, args.ffn, args.tokens, args.dtype, args.device = 256, 512, [1, 4, 16, 64, 512, 2048], "float32", "cpu"
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
        print(f"{row['tokens']:>6} tokens  {row['pass']:<16} {row['backend']:<12} {row['seconds'] * 1e3:9.2f} ms  "
              f"{row['tflops']:8.3f} TFLOP/s  {row['time_over_dense_floor']:5.2f}x the dense floor")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
