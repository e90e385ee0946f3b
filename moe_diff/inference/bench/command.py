"""`moe-diff bench`: the model to time (random weights at a config's shapes, or a checkpoint's), the runs with a
progress bar, and the written results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TextColumn

from moe_diff.checkpoint.open import open_model
from moe_diff.config import KERNEL_FIELDS, Kernels, load_config
from moe_diff.errors import UsageError, literal
from moe_diff.inference.bench import DEFAULT_SYSTEMS, BenchSettings, report, run_bench
from moe_diff.model import MoEDiffTransformer


def bench_model(source: Path, overrides: list[str], dtype: torch.dtype, device: torch.device, seed: int,
                tell: Callable[[str], None]) -> MoEDiffTransformer:
    """Random weights (seeded) at a YAML config's shapes, or the weights of any checkpoint form, which takes only
    the kernel overrides (model.attn_backend, model.moe_backend)."""
    if source.suffix in (".yaml", ".yml"):
        cfg = load_config(source, overrides).model
        torch.manual_seed(seed)
        with device:  # initialised where it runs: a multi-GB model need not pass through host memory
            return MoEDiffTransformer(cfg).to(dtype=dtype)
    fixed = [item for item in overrides if item.split("=")[0] not in (f"model.{name}" for name in KERNEL_FIELDS)]
    if fixed:
        raise UsageError(f"a checkpoint fixes its model: of the overrides, only model.attn_backend and "
                         f"model.moe_backend apply to it, not {', '.join(fixed)}")
    kernels = Kernels.of(load_config(None, overrides).model)
    return open_model(source, dtype=dtype, tell=tell, kernels=kernels).model.to(device)


def default_systems(model: MoEDiffTransformer) -> list[str]:
    """The default systems that apply: transformers' Mixtral only for standard attention."""
    return [name for name in DEFAULT_SYSTEMS if name != "transformers" or model.cfg.attention == "standard"]


def bench_and_write(model: MoEDiffTransformer, settings: BenchSettings, out: Path, console: Console) -> list[Path]:
    """Run the benchmark with a progress bar, print its table and write OUT.json, OUT.md and OUT.png."""
    settings.check(model)
    runs = len(settings.systems) * len(settings.batch_sizes) * len(settings.prompt_lengths) * (1 + settings.repeats)
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[label]}"), console=console) as progress:
        task = progress.add_task("bench", total=runs, label="copy bandwidth")
        done = []

        def advance(label: str) -> None:
            progress.update(task, completed=len(done), label=label)
            done.append(label)

        results = run_bench(model, settings, advance)
        progress.update(task, completed=runs, label="done")
    console.out(report.markdown(results), highlight=False)
    written = report.write(results, out)
    console.print("wrote " + ", ".join(literal(path) for path in written))
    return written
