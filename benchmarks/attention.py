"""Differential attention backends timed side by side: forward, backward and both, with TFLOP/s.

GPU (the issue's shapes):  python benchmarks/attention.py --seq 1024 4096 16384 32768 --window 4096
CPU (what CI runs):         python benchmarks/attention.py --cpu-size
Cases: diff V1 through each attention backend (sdpa is the official code's two SDPA calls), standard attention
with the same parameter count (one SDPA call over 2x heads: the yardstick), and diff V2 through each backend.
FlexAttention runs only on GPUs here (it is fused only when compiled). The Triton kernel joins when it exists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from moe_diff.bench import environment
from moe_diff.bench.measure import median_seconds
from moe_diff.bench.report import write_json
from moe_diff.kernels import attention_op

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def keys_per_query(seq: int, window: int | None) -> float:
    """Mean keys a causal (windowed) query sees."""
    if window is None or seq <= window:
        return (seq + 1) / 2
    return (window * (window + 1) / 2 + (seq - window) * window) / seq


def cases(batch: int, seq: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype,
          device: torch.device) -> dict[str, tuple[Callable, list[torch.Tensor], float]]:
    """name -> (op, inputs, forward FLOPs per attended key summed over heads and queries)."""
    def make(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, dtype=dtype, device=device) / 2

    lam = torch.tensor(0.5, device=device)
    found = {}
    # FlexAttention is fused only when compiled, which works on GPUs; on CPU it would time an unfused fallback
    for backend in ("reference", "sdpa", "flex") if device.type == "cuda" else ("reference", "sdpa"):
        diff_inputs = [make(batch, seq, heads, 2, d), make(batch, seq, kv_heads, 2, d),
                       make(batch, seq, kv_heads, 2 * d), lam]
        wrap = torch.compile if backend == "flex" else (lambda op: op)
        found[f"diff / {backend}"] = (wrap(attention_op(backend, "diff")), diff_inputs, 2 * heads * (2 * d + 4 * d))
        v2_inputs = [make(batch, seq, 4 * heads, d), make(batch, seq, 2 * kv_heads, d),
                     make(batch, seq, 2 * kv_heads, d), torch.rand(batch, seq, 2 * heads, device=device)]
        found[f"diff_v2 / {backend}"] = (wrap(attention_op(backend, "diff_v2")), v2_inputs, 4 * heads * 4 * d)
    yardstick = [make(batch, seq, 2 * heads, d), make(batch, seq, 2 * kv_heads, d), make(batch, seq, 2 * kv_heads, d)]
    found["standard 2x heads / sdpa (yardstick)"] = (attention_op("sdpa", "standard"), yardstick, 2 * heads * 4 * d)
    return found


def measure(seq: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    keys = keys_per_query(seq, args.window)
    for name, (op, inputs, flops_per_key) in cases(args.batch, seq, args.heads, args.kv_heads, args.head_dim,
                                                   DTYPES[args.dtype], device).items():
        forward_flops = flops_per_key * args.batch * seq * keys

        def forward(op: Callable = op, inputs: list = inputs) -> torch.Tensor:
            return op(*inputs, args.window)

        def both(forward: Callable = forward) -> None:
            forward().float().square().mean().backward()

        with torch.no_grad():
            forward_s = median_seconds(forward, device, args.repeats)
        trained = [t.requires_grad_() for t in inputs if t.is_floating_point() and t.dim() > 0]
        total = median_seconds(both, device, args.repeats)
        for t in trained:
            t.requires_grad_(False)
        row = {"case": name, "seq": seq, "forward_s": forward_s, "forward_tflops": forward_flops / forward_s / 1e12,
               "backward_s": total - forward_s, "forward_backward_s": total,
               "forward_backward_tflops": 3 * forward_flops / total / 1e12}
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16, help="differential heads (V1); V2 and the yardstick use 2x")
    parser.add_argument("--kv-heads", type=int, default=4, help="kv groups (V1)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--window", type=int, default=None)
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpu-size", action="store_true", help="seq 128 and 256, 4 heads, head_dim 32, float32")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.seq, args.heads, args.kv_heads, args.head_dim, args.dtype, args.device = [128, 256], 4, 2, 32, \
            "float32", "cpu"
    if min(args.seq) < 1 or args.repeats < 1 or args.heads % args.kv_heads:
        parser.error("--seq and --repeats must be positive and --kv-heads must divide --heads")
    device = torch.device(args.device)
    rows = [row for seq in args.seq for row in measure(seq, args, device)]
    results = {"environment": environment(device), "settings": vars(args), "results": rows}
    out = write_json(results, Path(args.out or Path(__file__).parent / "results" / f"attention-{device.type}.json"))
    for row in rows:
        print(f"{row['seq']:>6}  {row['case']:<38} {row['forward_s'] * 1e3:9.2f} ms fwd  "
              f"{row['forward_backward_s'] * 1e3:9.2f} ms fwd+bwd  {row['forward_backward_tflops']:.4f} TFLOP/s")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
