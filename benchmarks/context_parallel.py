"""Context parallelism on the CPU: each rank's peak memory in one training step (forward and backward) of one long
sequence, split over cp ranks against one process holding it whole, and the bytes each layer's key exchange
sends, with the config's window and without one.

    python benchmarks/context_parallel.py --lengths 4096 8192 16384 32768 --ranks 4

Every run is the training job's own step (Trainer.compute_gradients) of configs/tiny.yaml with batch 1, in fresh
processes (gloo), one thread each. Peak memory is the resident set's high-water mark over the step (Linux resets it
before), less the resident set before it: activations and their gradients, not the model or the corpus. On the
CPU, SDPA takes a window or document ids as a boolean mask per span, built once per forward, and keeps each layer's
score maps for the backward: over every key without a window (quadratic in length), in blocks of 1024 queries
with a window where the keys are a block and a window or more (linear); their sizes are reported apart, as
`moe-diff info` computes them (like the exchange), and without a window one process runs only lengths whose maps
fit (--single-up-to). Several ranks share 2 cores here, so the step times recorded say nothing about speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from rich.console import Console

from moe_diff import costs
from moe_diff.config import load_config
from moe_diff.device import environment
from moe_diff.files import write_json
from moe_diff.parallel import runtime
from moe_diff.parallel.context_parallel import context_shares
from moe_diff.training.trainer import Trainer

CONFIG = Path(__file__).parents[1] / "configs" / "tiny.yaml"


def resident_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (the high-water mark) of this process, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}: this benchmark reads Linux's memory counters")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_step(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    """One rank: the trainer built as the job builds it, then one step measured."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config(str(CONFIG), overrides)
    job = runtime.start(cfg.parallel, torch.device("cpu"))
    trainer = Trainer(cfg, Console(quiet=True), job)
    sent: list[int] = []
    all_to_all = funcol.all_to_all_single_autograd

    def counting(rows: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        sent.append(rows.numel() * rows.element_size())
        return all_to_all(rows, *args, **kwargs)

    funcol.all_to_all_single_autograd = counting
    job.barrier()
    before = resident_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the resident set now
    start = time.perf_counter()
    trainer.compute_gradients(details=False)
    seconds = time.perf_counter() - start
    peak = resident_kib("VmHWM")
    funcol.all_to_all_single_autograd = all_to_all
    result = {"rank": rank, "step_peak_bytes": (peak - before) * 1024, "resident_before_bytes": before * 1024,
              "forward_exchange_bytes_per_layer": sum(sent) // cfg.model.n_layers, "seconds": seconds}
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    job.barrier()
    job.shutdown()


def measure(length: int, cp: int, window: int | None, threads_note: str) -> dict:
    overrides = [f"train.seq_len={length}", f"model.max_seq_len={length}", f"parallel.cp={cp}",
                 "train.batch_size=1", "train.eval_every=0", "train.sample_tokens=0", "train.resume=never",
                 f"model.sliding_window={'null' if window is None else window}"]
    with tempfile.TemporaryDirectory() as out:
        overrides.append(f"train.out_dir={out}/run")
        mp.spawn(rank_step, args=(cp, free_port(), overrides, out), nprocs=cp)
        ranks = [json.loads(Path(out, f"rank-{rank}.json").read_text()) for rank in range(cp)]
    cfg = load_config(str(CONFIG), overrides).model
    shares = context_shares(cp, length, window)
    widths = costs.attention_widths(cfg)
    return {
        "seq_len": length, "cp": cp, "window": window, "ranks": ranks,
        "max_step_peak_bytes": max(rank["step_peak_bytes"] for rank in ranks),
        "predicted": {  # what `moe-diff info` reports for this layout (float32 here)
            "fused_attention_bytes_per_layer": max(costs.fused_attention_bytes(share.queries, share.keys, widths, 4)
                                                   for share in shares),
            "dense_mask_bytes": max(share.blocks for share in shares),  # training batches carry document ids
            "score_maps_bytes_per_layer": max(share.blocks for share in shares) * widths.maps * 4,
            "exchange_bytes_per_layer": [share.received * widths.key_value * 4 for share in shares],
        },
        "note": threads_note,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    parser.add_argument("--ranks", type=int, default=4, help="cp: processes each sequence is split over")
    parser.add_argument("--single-up-to", type=int, default=8192,
                        help="the longest sequence one process runs whole without a window (on the CPU, SDPA "
                             "keeps each layer's score maps for the backward: 16K tokens of the tiny model would "
                             "take about 26 GB)")
    parser.add_argument("--out", default="benchmarks/results/context-parallel-cpu.json")
    args = parser.parse_args()
    window = load_config(str(CONFIG), []).model.sliding_window
    rows = []
    for length in args.lengths:
        for each_window in (window, None):
            for cp in (1, args.ranks) if each_window or length <= args.single_up_to else (args.ranks,):
                row = measure(length, cp, each_window, f"{cp} process(es) on {os.cpu_count()} cores, 1 thread each")
                rows.append(row)
                print(f"T={length} window={each_window} cp={cp}: peak {row['max_step_peak_bytes'] / 2**20:.0f} MiB "
                      f"per rank, exchange {max(r['forward_exchange_bytes_per_layer'] for r in row['ranks'])} B "
                      f"per layer", flush=True)
    write_json({"benchmark": "context parallelism, one training step of one sequence", "config": "configs/tiny.yaml",
                "batch": 1, "exchange_note": "the bytes counted at torch's all-to-all include the document ids', "
                "sent once per forward (8 bytes a received position)",
                "environment": environment(torch.device("cpu")), "rows": rows}, Path(args.out))


if __name__ == "__main__":
    main()
