"""`moe-diff bench`: prefill and decode of this project's model timed apart, beside transformers' Mixtral and
vLLM on the same weights and a dense model with the same active parameters, at several batch sizes and prompt
lengths."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from moe_diff.config import ModelConfig
from moe_diff.device import environment, peak_memory, reset_peak_memory
from moe_diff.errors import UsageError
from moe_diff.inference.bench.measure import decode_step_bytes, memory_bandwidth, percentile
from moe_diff.inference.bench.routing import ROUTING_MODES, ZIPF_EXPONENT
from moe_diff.inference.bench.systems import Timing, build_system
from moe_diff.model import MoEDiffTransformer

SYSTEMS = ("moe-diff", "transformers", "vllm", "dense")
DEFAULT_SYSTEMS = ("moe-diff", "transformers", "dense")  # vllm when asked for: it needs vLLM installed
OURS = ("moe-diff", "moe-diff compiled")  # the rows of the 'moe-diff' system: eager, and compiled with `compile`


@dataclass
class BenchSettings:
    batch_sizes: list[int] = field(default_factory=lambda: [1, 4, 16, 64])
    prompt_lengths: list[int] = field(default_factory=lambda: [32, 512])
    new_tokens: int = 64  # per generation; the first is the prefill's, the others give the inter-token gaps
    routing: str = "own"  # see moe_diff.inference.bench.routing
    compile: bool = False  # time moe-diff with compiled decode steps too, and the others compiled (reported apart)
    repeats: int = 3  # timed generations per system and shape, taken in turns with the other systems
    systems: list[str] = field(default_factory=lambda: list(DEFAULT_SYSTEMS))
    seed: int = 0

    def check(self, model: MoEDiffTransformer) -> None:
        """Clear errors naming the setting and what it allows."""
        cfg = model.cfg
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UsageError(f"batch sizes must be positive integers, got {self.batch_sizes}")
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise UsageError(f"prompt lengths must be positive integers, got {self.prompt_lengths}")
        if self.repeats < 1:
            raise UsageError(f"repeats must be >= 1, got {self.repeats}")
        if self.new_tokens < 2:
            raise UsageError(f"new_tokens must be >= 2 (inter-token latency needs two tokens), got {self.new_tokens}")
        if max(self.prompt_lengths) + self.new_tokens > cfg.max_seq_len:
            raise UsageError(f"prompt length {max(self.prompt_lengths)} + new_tokens {self.new_tokens} exceeds the "
                             f"model's max_seq_len {cfg.max_seq_len}")
        if self.routing not in ROUTING_MODES:
            raise UsageError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {self.routing!r}")
        unknown = [name for name in self.systems if name not in SYSTEMS]
        if unknown or not self.systems:
            raise UsageError(f"systems must be some of {', '.join(SYSTEMS)}, got {self.systems}")
        if "transformers" in self.systems and cfg.attention != "standard":
            raise UsageError(f"the transformers comparison runs Mixtral, which has standard attention; this model "
                             f"has attention={cfg.attention!r} (leave 'transformers' out of the systems)")
        if "vllm" in self.systems and self.routing != "own":
            raise UsageError(f"--routing {self.routing} forces this project's and transformers' routers; vLLM runs the "
                             "model's own (use --routing own with the vllm system)")


def summarise(system: str, cfg: ModelConfig, element_size: int, batch: int, prompt_length: int, warmup_s: float,
              timing: Timing, peak_bandwidth: float, peak_bytes: int | None) -> dict[str, Any]:
    """One run's row: latencies, tokens/s, memory, and the bytes each decode step must read as a share of the
    measured peak bandwidth (step s feeds position prompt_length + s, which sees min(that + 1, window) keys)."""
    window = cfg.sliding_window or cfg.max_seq_len
    step_bytes = [decode_step_bytes(cfg, batch, min(prompt_length + step + 1, window), experts, element_size)
                  for step, experts in enumerate(timing.experts_read)]
    mean_itl = sum(timing.itls) / len(timing.itls)
    bytes_per_step = sum(step_bytes) / len(step_bytes) if step_bytes else None  # None: the experts read unknown
    return {
        "system": system, "batch": batch, "prompt_length": prompt_length,
        "warmup_s": warmup_s, "ttft_s": timing.ttft, "prefill_tokens_per_s": batch * prompt_length / timing.ttft,
        "itl_p50_s": percentile(timing.itls, 50), "itl_p90_s": percentile(timing.itls, 90),
        "itl_p99_s": percentile(timing.itls, 99), "itl_mean_s": mean_itl, "gaps_timed": len(timing.itls),
        "decode_tokens_per_s": batch / mean_itl,
        "experts_read_per_step": sum(timing.experts_read) / len(timing.experts_read) if step_bytes else None,
        "bytes_per_step": bytes_per_step,
        "bandwidth_bytes_per_s": bytes_per_step / mean_itl if step_bytes else None,
        "bandwidth_share": bytes_per_step / mean_itl / peak_bandwidth if step_bytes else None,
        "peak_memory_bytes": peak_bytes,
    }


def time_systems(systems: list, prompts: torch.Tensor, settings: BenchSettings, advance: Callable[[str], None],
                 element_size: int, peak_bandwidth: float) -> list[dict[str, Any]]:
    """One warm-up generation per system, then `repeats` rounds in which every system runs one timed generation
    in turn, so a machine whose speed drifts over seconds slows every system alike; each round begins with the
    next system, so the one that runs first after another's (and pays for the weights that went cold meanwhile,
    in its time to first token most) changes from round to round. Each system's rounds are pooled into one
    row."""
    batch, prompt_length = prompts.shape
    device = prompts.device
    labels = [f"{system.name} batch {batch} prompt {prompt_length}" for system in systems]
    warmups, timings, peaks = [], [[] for _ in systems], [[] for _ in systems]
    for system, label in zip(systems, labels, strict=True):
        advance(f"{label} (warm-up)")
        start = time.perf_counter()
        system.run(prompts, settings.new_tokens)
        warmups.append(time.perf_counter() - start)
        system.settle()
    for round_index in range(settings.repeats):
        for turn in range(len(systems)):
            index = (round_index + turn) % len(systems)  # each round begins with the next system
            advance(labels[index])
            reset_peak_memory(device)
            timings[index].append(systems[index].run(prompts, settings.new_tokens))
            peaks[index].append(peak_memory(device) if systems[index].in_process else None)
            systems[index].settle()
    return [summarise(system.name, system.cfg, element_size, batch, prompt_length, warmup_s, Timing.pooled(timed),
                      peak_bandwidth, max(peak) if system.in_process else None)
            for system, warmup_s, timed, peak in zip(systems, warmups, timings, peaks, strict=True)]


def run_bench(model: MoEDiffTransformer, settings: BenchSettings,
              advance: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """Time every system at every (prompt length, batch size): a warm-up generation (which compiles, when
    asked), then `repeats` timed generations of `new_tokens` tokens; `advance` is called before each run."""
    settings.check(model)
    device, element_size = model.tok_embeddings.weight.device, model.tok_embeddings.weight.element_size()
    bandwidth = memory_bandwidth(device)
    results: dict[str, Any] = {
        "new_tokens": settings.new_tokens,
        "environment": environment(device), "settings": asdict(settings), "model": asdict(model.cfg),
        "dtype": str(model.tok_embeddings.weight.dtype).removeprefix("torch."),
        "routing": settings.routing, "zipf_exponent": ZIPF_EXPONENT if settings.routing == "zipf" else None,
        "bandwidth_bytes_per_s": bandwidth, "peak_memory_kind": "cuda_allocated" if device.type == "cuda"
        else "process_peak_rss", "runs": [],
    }
    generator = torch.Generator().manual_seed(settings.seed)
    systems: list = []
    try:
        for name in settings.systems:  # one at a time, so that those built are closed if a later one fails
            systems += build_system(model, name, settings.routing, settings.compile,
                                    max(settings.prompt_lengths) + settings.new_tokens, max(settings.batch_sizes))
        with torch._dynamo.config.patch(recompile_limit=256, cache_size_limit=256):
            for prompt_length in settings.prompt_lengths:
                for batch in settings.batch_sizes:
                    prompts = torch.randint(1, model.cfg.vocab_size, (batch, prompt_length),
                                            generator=generator).to(device)
                    results["runs"] += time_systems(systems, prompts, settings, advance, element_size,
                                                    bandwidth["peak"])
    finally:
        for system in systems:
            system.close()
    results["speedups"] = speedups(results["runs"])
    return results


def speedups(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Decode and prefill tokens/s of this project's model (eager, and compiled where timed) over each other
    system's, per batch size and prompt length."""
    by_key = {(r["system"], r["batch"], r["prompt_length"]): r for r in runs}
    rows = []
    for (system, batch, prompt_length), ours in by_key.items():
        if system not in OURS:
            continue
        for other in SYSTEMS[1:]:
            theirs = by_key.get((other, batch, prompt_length))
            if theirs:
                rows.append({"system": system, "versus": other, "batch": batch, "prompt_length": prompt_length,
                             "decode": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
                             "prefill": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]})
    return rows
