"""What the inference benchmark measures besides time: copy bandwidth, peak memory and bytes read per step."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from moe_diff.config import ModelConfig
from moe_diff.costs import attention_params


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def call_times(work: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of `repeats` calls of `work`, after `warmup` untimed ones, the device synchronised."""
    for _ in range(warmup):
        work()
    seconds = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        work()
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def median_seconds(work: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    seconds = sorted(call_times(work, device, repeats, warmup))
    return seconds[len(seconds) // 2]


def memory_bandwidth(device: torch.device, mebibytes: int = 512, repeats: int = 5) -> dict[str, float]:
    """The device's practical peaks in bytes/s over a buffer far larger than any cache: a copy (bytes read
    plus written) and a read (a sum). A decode step mostly reads, so its share is taken of the larger."""
    source = torch.ones(mebibytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    size = source.numel() * source.element_size()
    # the best of the repeats, after a first pass that also faults the pages in
    copy = 2 * size / min(call_times(lambda: target.copy_(source), device, repeats, warmup=1))
    read = size / min(call_times(source.sum, device, repeats, warmup=1))
    return {"copy": copy, "read": read, "peak": max(copy, read)}


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's high-water RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then counts from the process start


def peak_memory(device: torch.device) -> int | None:
    """Bytes: CUDA memory allocated at most since the reset, or the process's peak RSS (None if unknown)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    kib = next((line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")), None)
    return int(kib) * 1024 if kib else None


def decode_step_bytes(cfg: ModelConfig, batch: int, keys_per_row: int, experts_read: int,
                      element_size: int) -> int:
    """Bytes one decode step must read: every weight outside the experts (the embedding only for the batch's
    rows), the experts chosen in the step counted once however many tokens chose them (`experts_read`,
    summed over layers), and the cached keys and values each row attends to."""
    per_layer = attention_params(cfg) + 2 * cfg.dim + cfg.n_experts * cfg.dim  # attention, norms, router
    weights = cfg.n_layers * per_layer + cfg.dim + cfg.vocab_size * cfg.dim + batch * cfg.dim
    experts = experts_read * 3 * cfg.dim * cfg.ffn_dim
    kv = cfg.n_layers * batch * keys_per_row * 2 * cfg.n_kv_heads * cfg.resolved_head_dim
    return (weights + experts + kv) * element_size


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()
