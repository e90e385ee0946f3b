"""Expert-parallel training steps: all-to-all dispatch volume and time per step, and tokens/s as ranks grow.

CPU (gloo, what CI runs):  python benchmarks/parallel.py --cpu-size
GPU (NCCL, one process per GPU):  python benchmarks/parallel.py --ranks 1 2 4 8 --device cuda
Every world size runs the same model with its experts sharded over all ranks (ep = world size), each rank on
its own batch (weak scaling: tokens per rank stay fixed). With one rank the benchmark also times the model
without expert parallelism, so the cost of dispatching through a 1-rank group (sort, exchange, combine) shows.
The exchange is timed around each all-to-all (synchronised), so its share is an upper bound of what
overlapping could hide.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.parallel import parallelize_module

from moe_diff.config import ModelConfig, ParallelConfig
from moe_diff.device import environment, synchronize
from moe_diff.files import write_json
from moe_diff.inference.bench.measure import median_seconds
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel import expert_parallel
from moe_diff.parallel.apply import distribute_parameters, wrap
from moe_diff.parallel.dims import ParallelDims
from moe_diff.parallel.gradients import sync_gradients
from moe_diff.parallel.plan import EXPERT_STYLES
from moe_diff.parallel.runtime import Runtime


class ExchangeMeter:
    """Wraps expert_parallel.exchange: bytes this rank sends forward (its routed rows out, the rows it computed
    back; the backward sends as many again) and seconds spent in those all-to-alls."""

    def __init__(self, device: torch.device):
        self.device, self.bytes, self.seconds = device, 0, 0.0
        self.original = expert_parallel.exchange

    def __enter__(self) -> ExchangeMeter:
        def timed(rows: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
            synchronize(self.device)
            start = time.perf_counter()
            out = self.original(rows, recv, send, group)
            synchronize(self.device)
            self.seconds += time.perf_counter() - start
            self.bytes += rows.numel() * rows.element_size()
            return out

        expert_parallel.exchange = timed
        return self

    def __exit__(self, *exc: object) -> None:
        expert_parallel.exchange = self.original


def model_config(args: argparse.Namespace) -> ModelConfig:
    return ModelConfig(vocab_size=args.vocab, dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                       n_kv_heads=args.heads // 2, ffn_dim=args.ffn, n_experts=args.experts, top_k=2,
                       max_seq_len=args.seq, attention="diff", attn_backend="sdpa",
                       moe_backend="grouped_mm" if args.device == "cuda" else "reference")


def time_steps(model: MoEDiffTransformer, tokens: torch.Tensor, device: torch.device, steps: int,
               job: Runtime | None, meter: ExchangeMeter | None = None) -> float:
    """Median seconds of a forward+backward (+ gradient averaging, as the training job does it) over `steps`
    steps after one warm-up (the meter, if any, counts the timed steps only)."""
    module = wrap(model, job) if job is not None else model

    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = module(tokens)
        (out.logits.float().logsumexp(-1).mean() + out.aux_loss).backward()
        if job is not None:
            sync_gradients(model, job)

    step()
    if meter is not None:
        meter.bytes, meter.seconds = 0, 0.0
    return median_seconds(step, device, steps, warmup=0)


def rank_main(rank: int, world: int, port: int, args: argparse.Namespace, results: mp.Queue) -> None:
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=300))
    torch.manual_seed(0)
    with device:
        model = MoEDiffTransformer(model_config(args))
    tokens = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(rank))
    tokens = tokens.to(device)
    row = {"ranks": world, "tokens_per_step": args.batch * args.seq * world}
    if world == 1:
        row["no_expert_parallel_s"] = time_steps(model, tokens, device, args.steps, None)
    dims = ParallelDims.from_config(ParallelConfig(ep=world), world)
    job = Runtime(dims, rank, rank, dims.build_mesh(device.type))  # one node: local rank = rank
    parallelize_module(model, job.submesh("ep"), EXPERT_STYLES)  # with one rank too, to time the dispatch through it
    distribute_parameters(model, job)
    with ExchangeMeter(device) as meter:
        seconds = time_steps(model, tokens, device, args.steps, job, meter)
    per_step = torch.tensor([meter.bytes / args.steps, meter.seconds / args.steps, seconds],
                            device=device)
    dist.all_reduce(per_step, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        seconds = per_step[2].item()
        row |= {"step_s": seconds, "tokens_per_s": row["tokens_per_step"] / seconds,
                "exchange_bytes_per_step_per_rank": per_step[0].item(), "exchange_s_per_step": per_step[1].item(),
                "exchange_share": per_step[1].item() / seconds}
        if world == 1:
            row["dispatch_overhead"] = seconds / row["no_expert_parallel_s"]
        results.put(row)
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=4, help="sequences per rank")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads shared by ranks")
    parser.add_argument("--cpu-size", action="store_true", help="ranks 1 and 2, a tiny model, gloo")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/parallel-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.ranks, args.device, args.dim, args.ffn, args.layers, args.heads, args.vocab, args.batch, args.seq, \
            args.steps = [1, 2], "cpu", 64, 128, 2, 4, 256, 2, 64, 2
    if min(args.ranks) < 1 or any(args.experts % r for r in args.ranks):
        parser.error(f"--ranks must be positive divisors of --experts ({args.experts})")
    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        parser.error(f"--ranks {max(args.ranks)} needs as many GPUs; this machine has {torch.cuda.device_count()}")
    context = mp.get_context("spawn")
    rows = []
    for world in args.ranks:
        queue = context.Queue()
        mp.start_processes(rank_main, args=(world, free_port(), args, queue), nprocs=world, start_method="spawn")
        rows.append(queue.get(timeout=60))
    base = rows[0]["tokens_per_s"] / rows[0]["ranks"]
    for row in rows:
        row["scaling_efficiency"] = row["tokens_per_s"] / (base * row["ranks"])
    device = torch.device(args.device)
    out = write_json({"environment": environment(device), "settings": vars(args), "results": rows},
                     Path(args.out or Path(__file__).parent / "results" / f"parallel-{device.type}.json"))
    for row in rows:
        extra = f"  dispatch overhead {row['dispatch_overhead']:.2f}x" if "dispatch_overhead" in row else ""
        print(f"{row['ranks']:>3} ranks  {row['tokens_per_s']:10.0f} tok/s  scaling {row['scaling_efficiency']:.2f}  "
              f"all-to-all {row['exchange_bytes_per_step_per_rank'] / 2**20:8.2f} MiB/rank/step, "
              f"{1e3 * row['exchange_s_per_step']:7.2f} ms ({100 * row['exchange_share']:.0f}% of the step){extra}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
