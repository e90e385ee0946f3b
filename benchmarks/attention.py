"""Differential attention backends timed side by side: forward, backward and both, with TFLOP/s.

GPU (the issue's shapes):  python benchmarks/attention.py --seq 1024 4096 16384 32768 --window 4096
CPU (what CI runs):         python benchmarks/attention.py --cpu-size
Cases: diff V1 through each backend (sdpa is the official code's two SDPA calls; "sdpa 4 calls" splits the
2d-wide values so SDPA's flash kernel takes them, its second variant), diff V2 through each backend (sdpa: one
call over the doubled query heads, then the subtraction), standard attention through the Triton kernel, and
standard attention with the same parameter count (one SDPA call over 2x heads: the yardstick). FlexAttention
and the Triton kernel run only on GPUs here (fused only when compiled); the reference only up to
--reference-max-seq (it materialises the maps). A case that fails records its error and the others go on.
Whole-model training steps are timed by benchmarks/train_step.py.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from moe_diff.costs import mean_keys_per_query
from moe_diff.device import DTYPES, environment
from moe_diff.files import write_json
from moe_diff.inference.bench.measure import median_seconds
from moe_diff.kernels import attention_op
from moe_diff.kernels.diff_attention import diff_attention, sdpa_attention
from moe_diff.kernels.mask import AttentionMask

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # what every backend runs


def sdpa_value_halves(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """One map over each half of the values: SDPA's flash kernel needs values as wide as the keys."""
    return torch.cat([sdpa_attention(q, k, half, mask) for half in v.chunk(2, dim=-1)], -1)


def backends(device: torch.device, seq: int, reference_max_seq: int) -> list[str]:
    names = ["reference"] if seq <= reference_max_seq else []
    return names + (["sdpa", "flex", "triton"] if device.type == "cuda" else ["sdpa"])


def mode_inputs(mode: str, batch: int, seq: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype,
                device: torch.device) -> list[torch.Tensor]:
    """q, k, v (and lambda) of one mode with the same attention parameters: `heads` diff heads over `kv_heads`
    groups, or twice the heads and groups of width d for diff_v2's pairs and for standard attention."""
    shapes = {"diff": [(batch, seq, heads, 2, d), (batch, seq, kv_heads, 2, d), (batch, seq, kv_heads, 2 * d)],
              "diff_v2": [(batch, seq, 4 * heads, d), (batch, seq, 2 * kv_heads, d), (batch, seq, 2 * kv_heads, d)],
              "standard": [(batch, seq, 2 * heads, d), (batch, seq, 2 * kv_heads, d), (batch, seq, 2 * kv_heads, d)]}
    tensors = [torch.randn(shape, dtype=dtype, device=device) / 2 for shape in shapes[mode]]
    if mode == "diff":
        tensors.append(torch.tensor(0.5, device=device))
    elif mode == "diff_v2":
        tensors.append(torch.rand(batch, seq, 2 * heads, device=device))
    return tensors


def cases(batch: int, seq: int, heads: int, kv_heads: int, d: int, dtype: torch.dtype, device: torch.device,
          reference_max_seq: int) -> dict[str, tuple[Callable, list[torch.Tensor], float]]:
    """name -> (op, inputs, forward FLOPs per attended key summed over heads and queries)."""
    diff_inputs, v2_inputs, yardstick = (mode_inputs(mode, batch, seq, heads, kv_heads, d, dtype, device)
                                         for mode in ("diff", "diff_v2", "standard"))
    diff_flops, v2_flops, standard_flops = 2 * heads * (2 * d + 4 * d), 4 * heads * 4 * d, 2 * heads * 4 * d
    found = {}
    for backend in backends(device, seq, reference_max_seq):
        wrap = torch.compile if backend == "flex" else (lambda op: op)  # FlexAttention is fused only compiled
        found[f"diff / {backend}"] = (wrap(attention_op(backend, "diff")), diff_inputs, diff_flops)
        if backend == "sdpa":
            found["diff / sdpa 4 calls"] = (partial(diff_attention, sdpa_value_halves), diff_inputs, diff_flops)
        found[f"diff_v2 / {backend}"] = (wrap(attention_op(backend, "diff_v2")), v2_inputs, v2_flops)
        if backend == "triton":
            found["standard 2x heads / triton"] = (attention_op("triton", "standard"), yardstick, standard_flops)
    found["standard 2x heads / sdpa (yardstick)"] = (attention_op("sdpa", "standard"), yardstick, standard_flops)
    return found


def timed_case(op: Callable, inputs: list[torch.Tensor], forward_flops: float, window: int | None,
               device: torch.device, repeats: int) -> dict:
    def forward() -> torch.Tensor:
        return op(*inputs, AttentionMask(window))  # a mask per call, as each forward pass builds one

    def both() -> None:
        forward().float().square().mean().backward()

    with torch.no_grad():
        forward_s = median_seconds(forward, device, repeats)
    trained = [t.requires_grad_() for t in inputs if t.is_floating_point() and t.dim() > 0]
    try:
        total = median_seconds(both, device, repeats)
    finally:
        for t in trained:
            t.requires_grad_(False)
            t.grad = None
    return {"forward_s": forward_s, "forward_tflops": forward_flops / forward_s / 1e12,
            "backward_s": total - forward_s, "forward_backward_s": total,
            "forward_backward_tflops": 3 * forward_flops / total / 1e12}


def measure(seq: int, args: argparse.Namespace, device: torch.device) -> list[dict]:
    rows = []
    keys = mean_keys_per_query(seq, args.window)
    for name, (op, inputs, flops_per_key) in cases(args.batch, seq, args.heads, args.kv_heads, args.head_dim,
                                                   DTYPES[args.dtype], device, args.reference_max_seq).items():
        row = {"case": name, "seq": seq}
        try:
            row |= timed_case(op, inputs, flops_per_key * args.batch * seq * keys, args.window, device, args.repeats)
        except (RuntimeError, ValueError) as error:  # one backend's failure (memory, compiler) is a result too
            row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
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
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--reference-max-seq", type=int, default=4096, help="longest seq for the reference")
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
        print(f"{row['seq']:>6}  {row['case']:<38} " + (row["error"] if "error" in row else
              f"{row['forward_s'] * 1e3:9.2f} ms fwd  {row['forward_backward_s'] * 1e3:9.2f} ms fwd+bwd  "
              f"{row['forward_tflops']:7.1f} / {row['forward_backward_tflops']:7.1f} TFLOP/s"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
