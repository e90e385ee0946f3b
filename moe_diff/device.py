"""The device a job runs on: choosing it, dtype names, synchronising, peak memory, the dense bf16 peak, and the
environment (device, library versions, commit) stored beside every measurement."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

import torch

from moe_diff.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}

# Dense bf16 tensor-core peaks in FLOP/s from the vendors' data sheets (no sparsity), matched
# against torch.cuda.get_device_name(). MFU is reported only for devices listed here.
PEAK_BF16_FLOPS = {
    "H200": 989e12,
    "H100 PCIe": 756e12,
    "H100": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "L4": 121e12,
}


def resolve_device(name: str) -> torch.device:
    """train.device: auto (cuda when available, else cpu), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"train.device={name!r} is not allowed: auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} is not allowed: no CUDA device is available")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's high-water RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux: the peak then counts from the process start


def peak_memory(device: torch.device) -> int:
    """Bytes: CUDA memory allocated at most since the last reset, or the process's peak RSS (since the last reset
    on Linux, since the start elsewhere)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None where it is unknown (CPUs, unlisted GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():  # more specific names come first
        if key in name:
            return value
    return None


def environment(device: torch.device) -> dict[str, Any]:
    """Device, library versions and the source commit, stored beside the numbers."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        lines = cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []
        name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
                    platform.processor() or "cpu")
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for package in ("transformers", "triton", "vllm"):
        try:
            versions[package] = __import__(package).__version__
        except ImportError:
            pass  # optional: recorded where installed
    return {"device": device.type, "device_name": name, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "versions": versions, "commit": source_commit()}


def source_commit() -> str:
    """`git describe` of the checkout holding the package, or "unknown" where git cannot say (git is not
    installed, the package is not in a repository, git fails)."""
    root = Path(__file__).resolve().parents[1]
    try:
        described = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty"], capture_output=True,
                                   text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = described.stdout.strip()
    return commit if described.returncode == 0 and commit else "unknown"
