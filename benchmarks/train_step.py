"""Whole-model training steps (forward, backward, AdamW) side by side: this project's model in each attention mode
with the `auto` backends and transformers' MixtralForCausalLM (grouped_mm experts, SDPA attention) at the same
shapes, in interleaved rounds; tokens/s, MFU and memory.

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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_diff.config import ModelConfig, TrainConfig, load_config
from moe_diff.costs import flops_per_token, param_counts
from moe_diff.device import environment, peak_flops, reset_peak_memory, synchronize
from moe_diff.files import write_json
from moe_diff.model import MoEDiffTransformer
from moe_diff.training.optim import build_optimizer
from moe_diff.training.trainer import autocast, cross_entropy

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


def trained(name: str, cfg: ModelConfig, model: nn.Module, device: torch.device, compiled: bool,
            loss_of: Callable[[nn.Module, torch.Tensor], torch.Tensor]) -> System:
    """A system whose step is loss_of(model or its compiled form, tokens) under autocast, its backward, and an
    AdamW step with the training job's parameter groups."""
    optimizer = build_optimizer(model, TrainConfig())
    forward = torch.compile(model) if compiled else model

    def step(tokens: torch.Tensor) -> None:
        with autocast(device, "auto"):
            loss = loss_of(forward, tokens)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return System(name + (" compiled" if compiled else ""), cfg, model, step, compiled)


def own_system(cfg: ModelConfig, device: torch.device, compiled: bool) -> System:
    """This project's model: cross-entropy plus the router losses, as the training job adds them."""
    torch.manual_seed(0)
    with device:
        model = MoEDiffTransformer(cfg)

    def loss_of(forward: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        out = forward(tokens[:, :-1])
        return cross_entropy(out.logits, tokens[:, 1:]) + out.aux_loss

    return trained(cfg.attention, cfg, model, device, compiled, loss_of)


def transformers_system(cfg: ModelConfig, device: torch.device, compiled: bool) -> System:
    """transformers' Mixtral at the same (standard) shapes, with its experts implementation pinned to grouped_mm and
    SDPA attention, trained as its users do (labels given: its loss adds the router's auxiliary loss). Under
    autocast its grouped_mm casts the rows to the float32 weights, so its experts multiply in float32."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    from moe_diff.checkpoint.mixtral import hf_config_from_model

    torch.manual_seed(0)
    config = MixtralConfig(**hf_config_from_model(cfg, torch.float32))
    with device:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa",
                                                 experts_implementation="grouped_mm")

    def loss_of(forward: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
        inputs = tokens[:, :-1]
        return forward(input_ids=inputs, labels=inputs, output_router_logits=True).loss

    return trained("transformers", cfg, model, device, compiled, loss_of)


def build_systems(cfg: ModelConfig, device: torch.device, compiled: bool, with_transformers: bool) -> list[System]:
    systems = [own_system(dataclasses.replace(cfg, attention=mode), device, compiled) for mode in MODES]
    if with_transformers:
        systems.append(transformers_system(dataclasses.replace(cfg, attention="standard"), device, compiled))
    return systems


def resident_bytes(model: nn.Module) -> int:
    """Parameters, gradients and AdamW's two moments: four float32 copies of every parameter."""
    return 4 * sum(p.numel() * p.element_size() for p in model.parameters())


def timed_rounds(systems: list[System], tokens: torch.Tensor, rounds: int, steps: int,
                 device: torch.device) -> dict[str, dict]:
    """Two warm-up steps per system (compiling, where compiled), then `rounds` rounds in which each system runs
    `steps` timed steps in turn; per system the median seconds per step and the peak memory a step adds."""
    for system in systems:
        for _ in range(2):
            system.step(tokens)
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
                system.step(tokens)
            synchronize(device)
            seconds[system.name].append((time.perf_counter() - start) / steps)
            if device.type == "cuda":
                extra[system.name] = max(extra[system.name], torch.cuda.max_memory_allocated(device) - before)
    return {name: {"seconds_per_step": statistics.median(times),
                   "step_peak_extra_bytes": extra[name] if device.type == "cuda" else None}
            for name, times in seconds.items()}


def rows_for(systems: list[System], timings: dict[str, dict], tokens: torch.Tensor, device: torch.device) -> list:
    peak = peak_flops(device)
    n_tokens = tokens.shape[0] * (tokens.shape[1] - 1)
    rows = []
    for system in systems:
        timing = timings[system.name]
        tokens_per_s = n_tokens / timing["seconds_per_step"]
        step_flops = 3 * flops_per_token(system.cfg, tokens.shape[1] - 1).total  # forward + backward (2x)
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
    widths = load_config(args.config).model
    cfg = dataclasses.replace(widths, n_layers=args.layers, max_seq_len=max(args.seq, widths.max_seq_len),
                              attn_backend="auto", moe_backend="auto")
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), device=device)
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"train-step-{device.type}.json")
    results = {"environment": environment(device), "settings": vars(args), "model": dataclasses.asdict(cfg),
               "precision": "bfloat16 autocast, float32 weights" if device.type == "cuda" else "float32",
               "peak_flops": peak_flops(device), "rows": []}
    for compiled in [False] + ([True] if args.compile else []):
        spent = time.perf_counter() - started
        if compiled and args.budget is not None and spent > args.budget / 2:
            results["compiled_skipped"] = f"{spent:.0f} s of the {args.budget:.0f} s budget went to the eager models"
        else:
            systems = build_systems(cfg, device, compiled, args.transformers)
            results["rows"] += rows_for(systems, timed_rounds(systems, tokens, args.rounds, args.steps, device),
                                        tokens, device)
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
