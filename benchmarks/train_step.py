"""Whole-model training steps (forward, backward, AdamW) side by side: the training job's own step (`moe-diff
train`'s Trainer.train_step on a non-logging step: its batches of the built-in corpus with document ids, the router
losses, gradient clipping, the non-finite check) in each attention mode with the `auto` backends, and transformers'
MixtralForCausalLM (grouped_mm experts, SDPA attention, its router loss) on the same tokens without document ids,
at the same shapes, in interleaved rounds; tokens/s, MFU and memory.

GPU (the suite's stage):  python benchmarks/train_step.py --compile --budget 120
    configs/small.yaml widths with 4 layers, sequence 4096, batch 8, bf16 autocast over float32 weights (what
    `moe-diff train` does on CUDA); --compile adds compiled models once the eager rounds are written, if the budget
    leaves room.
CPU (what CI runs):       python benchmarks/train_step.py --cpu-size
MFU is tokens/s x 3 x forward FLOPs per token (moe_diff.costs) over the device's dense bf16 peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from moe_diff.config import Config, ModelConfig, TrainConfig, load_config
from moe_diff.costs import flops_per_token, param_counts
from moe_diff.data import make_batch
from moe_diff.device import environment, peak_flops, reset_peak_memory, synchronize
from moe_diff.files import write_json
from moe_diff.parallel import runtime
from moe_diff.training.optim import build_optimizer
from moe_diff.training.trainer import Trainer, autocast

MODES = ("standard", "diff", "diff_v2")
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class System:
    """One model with its optimizer, and the function that runs one training step on it."""

    name: str
    cfg: ModelConfig  # the shapes its FLOPs are counted from
    model: nn.Module
    step: Callable[[torch.Tensor], None]
    compiled: bool


def own_system(trainer: Trainer, compiled: bool) -> System:
    """The training job's trainer, each step a non-logging train_step."""

    def step() -> None:
        trainer.train_step(details=False)

    name = trainer.cfg.model.attention + (" compiled" if compiled else "")
    return System(name, trainer.cfg.model, trainer.model, step, compiled)


def transformers_system(cfg: ModelConfig, tokens: torch.Tensor, device: torch.device, compiled: bool) -> System:
    """transformers' Mixtral at the same (standard) shapes, with its experts implementation pinned to grouped_mm and
    SDPA attention, trained as its users do (labels given: its loss adds the router's auxiliary loss) with AdamW
    and the job's parameter groups, on `tokens` every step. Under autocast its grouped_mm casts the rows to the
    float32 weights, so its experts multiply in float32."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_diff.checkpoint.mixtral import hf_config_from_model

    torch.manual_seed(0)
    config = MixtralConfig(**hf_config_from_model(cfg, torch.float32))
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm")
    optimizer = build_optimizer(model, TrainConfig())
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with autocast(device, "auto"):
            loss = forward(input_ids=tokens, labels=tokens, output_router_logits=True).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return System("transformers" + (" compiled" if compiled else ""), cfg, model, step, compiled)


def job_config(args: argparse.Namespace, out_dir: Path) -> Config:
    """The config a user's `moe-diff train` would run at the benchmark's shapes: the given widths, `auto` kernels,
    no validation or traces (a non-logging step runs neither)."""
    widths = load_config(args.config).model
    return load_config(args.config, [
        f"model.n_layers={args.layers}", f"model.max_seq_len={max(args.seq, widths.max_seq_len)}",
        "model.attn_backend=auto", "model.moe_backend=auto", f"train.seq_len={args.seq}",
        f"train.batch_size={args.batch}", "train.grad_accum=1", f"train.device={args.device}",
        f"train.out_dir={out_dir}", "train.eval_every=0", "train.trace_every=0"])


def build_systems(cfg: Config, device: torch.device, compiled: bool, with_transformers: bool) -> list[System]:
    """A trainer per attention mode (compiled as train.compile does it), then transformers on the tokens of the
    first windows of the same corpus."""
    trainers = [Trainer(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=mode),
                                            train=dataclasses.replace(cfg.train, out_dir=f"{cfg.train.out_dir}/{mode}",
                                                                      compile=compiled)),
                        Console(quiet=True), runtime.start(cfg.parallel, device))
                for mode in MODES]
    systems = [own_system(trainer, compiled) for trainer in trainers]
    if with_transformers:
        windows = trainers[0].train_windows
        tokens = make_batch(windows, list(range(cfg.train.batch_size))).tokens.to(device)
        systems.append(transformers_system(dataclasses.replace(cfg.model, attention="standard"), tokens, device,
                                           compiled))
    return systems


def resident_bytes(model: nn.Module) -> int:
    """Parameters, gradients and AdamW's two moments: four float32 copies of every parameter."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def timed_rounds(systems: list[System], rounds: int, steps: int, device: torch.device) -> dict[str, dict]:
    """Two warm-up steps per system (compiling, where compiled), then `rounds` rounds in which each system runs
    `steps` timed steps in turn; per system the median seconds per step and the peak memory a step adds."""
    for system in systems:
        for _ in range(2):
            system.step()
    synchronize(device)
    seconds: dict[str, list[float]] = {s.name: [] for s in systems}
    extra: dict[str, int] = {s.name: 0 for s in systems}
    for _ in range(rounds):
        for system in systems:
            reset_peak_memory(device)
            before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            synchronize(device)
            start = time.perf_counter()
            for _ in range(steps):
                system.step()
            synchronize(device)
            seconds[system.name].append((time.perf_counter() - start) / steps)
            if device.type == "cuda":
                extra[system.name] = max(extra[system.name], torch.cuda.max_memory_allocated(device) - before)
    return {name: {"seconds_per_step": statistics.median(times),
                   "step_peak_extra_bytes": extra[name] if device.type == "cuda" else None}
            for name, times in seconds.items()}


def rows_for(systems: list[System], timings: dict[str, dict], train: TrainConfig, device: torch.device) -> list:
    peak = peak_flops(device)
    n_tokens = train.batch_size * train.seq_len
    rows = []
    for system in systems:
        timing = timings[system.name]
        tokens_per_s = n_tokens / timing["seconds_per_step"]
        step_flops = 3 * flops_per_token(system.cfg, train.seq_len).total  # forward + backward (2x)
        rows.append({"system": system.name, "attention": system.cfg.attention, "compiled": system.compiled,
                     "parameters": param_counts(system.cfg).total, "tokens_per_step": n_tokens,
                     "tokens_per_s": tokens_per_s, "tflops": tokens_per_s * step_flops / 1e12,
                     "mfu": tokens_per_s * step_flops / peak if peak else None,
                     "resident_bytes": resident_bytes(system.model)} | timing)
    return rows


def ratios(rows: list[dict]) -> dict[str, float]:
    """The headline ratios of tokens/s: each diff mode over standard, and standard over transformers, eager and
    compiled alike where both were measured."""
    by_name = {row["system"]: row["tokens_per_s"] for row in rows}
    found = {}
    for suffix in ("", " compiled"):
        standard = by_name.get("standard" + suffix)
        if standard is None:
            continue
        for mode in ("diff", "diff_v2"):
            if mode + suffix in by_name:
                found[f"{mode}{suffix} / standard{suffix}"] = by_name[mode + suffix] / standard
        if "transformers" + suffix in by_name:
            found[f"standard{suffix} / transformers{suffix}"] = standard / by_name["transformers" + suffix]
    return found


def free(systems: list[System], device: torch.device) -> None:
    systems.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "small.yaml"), help="widths from this config")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096, help="tokens per sequence")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per system per round")
    parser.add_argument("--compile", action="store_true", help="also time compiled models, if the budget allows")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: compiled models are timed only while under half of it is spent")
    parser.add_argument("--no-transformers", dest="transformers", action="store_false")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cpu-size", action="store_true",
                        help="configs/tiny.yaml widths, 2 layers, sequence 64, batch 2, one round of one step")
    parser.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train-step-DEVICE.json)")
    args = parser.parse_args(argv)
    if args.cpu_size:
        args.config, args.layers, args.seq, args.batch = str(ROOT / "configs" / "tiny.yaml"), 2, 64, 2
        args.rounds, args.steps, args.device = 1, 1, "cpu"
    if min(args.layers, args.seq, args.batch, args.rounds, args.steps) < 1:
        parser.error("--layers, --seq, --batch, --rounds and --steps must be positive")
    started = time.perf_counter()
    device = torch.device(args.device)
    out_dir = tempfile.TemporaryDirectory(prefix="train-step-")  # the trainers' run directories (never written)
    cfg = job_config(args, Path(out_dir.name))
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train-step-{device.type}.json")
    results = {"environment": environment(device), "settings": vars(args), "model": dataclasses.asdict(cfg.model),
               "train": {key: getattr(cfg.train, key) for key in ("batch_size", "seq_len", "grad_clip", "precision",
                                                                   "load_balance_over")},
               "precision": "bfloat16 autocast, float32 weights" if device.type == "cuda" else "float32",
               "peak_flops": peak_flops(device), "rows": []}
    for compiled in [False] + ([True] if args.compile else []):
        spent = time.perf_counter() - started
        if compiled and args.budget is not None and spent > args.budget / 2:
            results["compiled_skipped"] = f"{spent:.0f} s of the {args.budget:.0f} s budget went to the eager models"
        else:
            systems = build_systems(cfg, device, compiled, args.transformers)
            results["rows"] += rows_for(systems, timed_rounds(systems, args.rounds, args.steps, device), cfg.train,
                                        device)
            free(systems, device)
            results["ratios"] = ratios(results["rows"])
        write_json(results, out)  # after every pass, so a stopped run keeps what it measured
    for row in results["rows"]:
        mfu = f"  MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""
        print(f"{row['system']:<22} {row['tokens_per_s']:12.0f} tok/s  {row['seconds_per_step'] * 1e3:9.1f} ms/step"
              f"{mfu}")
    for name, value in results["ratios"].items():
        print(f"{name:<40} {value:.3f}x")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
