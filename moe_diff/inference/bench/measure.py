"""What the inference benchmark measures besides time: copy bandwidth, peak memory and bytes read per step."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from moe_diff.config import ModelConfig
from moe_diff.costs import kv_cache_bytes_per_token, param_counts
from moe_diff.device import synchronize


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


def decode_step_bytes(cfg: ModelConfig, batch: int, keys_per_row: int, experts_read: int,
                      element_size: int) -> int:
    """Bytes one decode step must read: every weight outside the experts (of the input embedding only the batch's
    rows; the output head whole, tied or not), the experts chosen in the step counted once however many tokens
    chose them (`experts_read`, summed over layers), and the cached keys and values each row attends to."""
    params = param_counts(cfg)
    separate_input_embedding = params.embedding - cfg.vocab_size * cfg.dim  # none when tied to the head
    weights = params.total - params.experts_total - separate_input_embedding + batch * cfg.dim
    experts = experts_read * params.experts_total // (cfg.n_layers * cfg.n_experts)
    kv = batch * keys_per_row * kv_cache_bytes_per_token(cfg, element_size)
    return (weights + experts) * element_size + kv


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between order statistics."""
    return torch.quantile(torch.tensor(values, dtype=torch.float64), q / 100).item()
