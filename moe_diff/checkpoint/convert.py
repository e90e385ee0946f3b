"""Checkpoints from one form into another: Hugging Face Mixtral <-> the single-file schema, and any checkpoint form
(a run, a training checkpoint) into either."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from moe_diff.checkpoint import schema
from moe_diff.checkpoint.mixtral import from_hf_mixtral, to_hf_mixtral
from moe_diff.checkpoint.open import open_model
from moe_diff.errors import UsageError

FORMATS = ("moe-diff", "mixtral")


def refuse_to_overwrite(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"destination {dst} exists and is not empty; refusing to overwrite it")


def convert(src: Path, dst: Path, dtype: torch.dtype | None = None) -> str:
    """A Mixtral directory (config.json) into a single-file checkpoint, or one of those into Mixtral; the direction
    comes from what `src` holds. Returns what was done, in words."""
    refuse_to_overwrite(dst)
    if (src / "config.json").is_file():
        schema.save(from_hf_mixtral(src, dtype=dtype), dst)
        return f"imported Mixtral {src} -> moe-diff checkpoint {dst}"
    if (src / schema.CONFIG_FILE).is_file():
        to_hf_mixtral(schema.load(src, dtype=dtype), dst)
        return f"exported moe-diff checkpoint {src} -> Mixtral {dst}"
    raise UsageError(f"{src} is neither a Mixtral directory (config.json) nor a moe-diff checkpoint "
                     f"({schema.CONFIG_FILE})")


def export(source: Path, dst: Path, format: str, dtype: torch.dtype | None = None,
           tell: Callable[[str], None] | None = None) -> str:
    """Any checkpoint form (a run: its newest valid checkpoint; verified, experts checked) as one directory in
    `format` (see FORMATS). Returns what was done, in words."""
    if format not in FORMATS:
        raise UsageError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    refuse_to_overwrite(dst)
    stored = open_model(source, dtype=dtype, tell=tell)
    if format == "mixtral":
        to_hf_mixtral(stored.model, dst)
    else:
        schema.save(stored.model, dst)
    return f"exported {stored.path} -> {dst} ({format})"
