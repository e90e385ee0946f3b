"""`moe-diff bench`: the model to time (random weights at a config's shapes, or a checkpoint's), the runs with a
progress bar, and the written results."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TextColumn

from moe_diff.checkpoint.open import open_model
from moe_diff.config import load_config
from moe_diff.errors import UsageError
from moe_diff.inference.bench import SYSTEMS, BenchSettings, report, run_bench
from moe_diff.model import MoEDiffTransformer


def bench_model(source: Path, overrides: list[str], dtype: torch.dtype, device: torch.device, seed: int,
                tell: Callable[[str], None]) -> MoEDiffTransformer:
    """Random weights (seeded) at a YAML config's shapes, or the weights of any checkpoint form."""
    if source.suffix in (".yaml", ".yml"):
        cfg = load_config(source, overrides).model
        torch.manual_seed(seed)
        with device:  # initialised where it runs: a multi-GB model need not pass through host memory
            return MoEDiffTransformer(cfg).to(dtype=dtype)
    if overrides:
        raise UsageError("dotlist overrides apply to a YAML config, not to a checkpoint")
    return open_model(source, dtype=dtype, tell=tell).model.to(device)


def default_systems(model: MoEDiffTransformer) -> list[str]:
    """Every system that applies: transformers' Mixtral only for standard attention."""
    return [name for name in SYSTEMS if name != "transformers" or model.cfg.attention == "standard"]


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
    console.print("wrote " + ", ".join(str(path) for path in written))
    return written
