"""Checkpoints from one form into another: Hugging Face Mixtral <-> the single-file schema, an exported
transformers directory -> the single-file schema, and any checkpoint form (a run, a training checkpoint) into the
single-file schema, Mixtral or a transformers directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch

from moe_diff.checkpoint import schema
from moe_diff.checkpoint.hf_directory import (
    HF_CONFIG_FILE,
    exported_tokenizer,
    is_moe_diff_directory,
    load_moe_diff_directory,
)
from moe_diff.checkpoint.mixtral import from_hf_mixtral, to_hf_mixtral
from moe_diff.checkpoint.open import StoredModel, open_model
from moe_diff.checkpoint.schema import TOKENIZER_FILE
from moe_diff.config import DataConfig
from moe_diff.errors import UsageError

FORMATS = ("moe-diff", "mixtral", "hf")


def refuse_to_overwrite(dst: Path) -> None:
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"destination {dst} exists and is not empty; refusing to overwrite it")


def convert(src: Path, dst: Path, dtype: torch.dtype | None = None) -> str:
    """A Mixtral or exported transformers directory (config.json) into a single-file checkpoint, or one of those
    into Mixtral; the direction comes from what `src` holds. Returns what was done, in words."""
    refuse_to_overwrite(dst)
    if is_moe_diff_directory(src):
        schema.save(load_moe_diff_directory(src, dtype), dst, exported_tokenizer(src))
        return f"imported transformers directory {src} -> moe-diff checkpoint {dst}"
    if (src / HF_CONFIG_FILE).is_file():
        record = DataConfig(tokenizer=str(src / TOKENIZER_FILE)) if (src / TOKENIZER_FILE).is_file() else None
        schema.save(from_hf_mixtral(src, dtype=dtype), dst, record)
        return f"imported Mixtral {src} -> moe-diff checkpoint {dst}"
    if (src / schema.CONFIG_FILE).is_file():
        to_hf_mixtral(schema.load(src, dtype=dtype), dst)
        return f"exported moe-diff checkpoint {src} -> Mixtral {dst}"
    raise UsageError(f"{src} is neither a Mixtral or exported transformers directory (config.json) nor a moe-diff "
                     f"checkpoint ({schema.CONFIG_FILE})")


def export(source: Path, dst: Path, format: str, dtype: torch.dtype | None = None,
           tell: Callable[[str], None] | None = None, tokenizer: str | None = None) -> str:
    """Any checkpoint form (a run: its newest valid checkpoint; verified, experts checked) as one directory in
    `format` (see FORMATS). `moe-diff` and `hf` carry the tokenizer: `tokenizer` ('byte' or a tokenizer.json) or
    else the source's (StoredModel.tokenizer). Returns what was done, in words."""
    if format not in FORMATS:
        raise UsageError(f"format {format!r} is not one of {', '.join(FORMATS)}")
    if tokenizer is not None and format == "mixtral":
        raise UsageError("--tokenizer is for --format moe-diff or hf (a Mixtral export carries no tokenizer)")
    refuse_to_overwrite(dst)
    stored = open_model(source, dtype=dtype, tell=tell)
    if format == "mixtral":
        to_hf_mixtral(stored.model, dst)
    elif format == "hf":
        save_hf_directory(stored, dst, tokenizer)
    else:
        schema.save(stored.model, dst, *exported_data(stored, tokenizer))
    return f"exported {stored.path} -> {dst} ({format})"


def exported_data(stored: StoredModel, tokenizer: str | None) -> tuple[DataConfig | None, str | None]:
    """What an export records of its data (the source's data config, its tokenizer the one named where given) and
    the text of the tokenizer.json it stores (StoredModel.tokenizer's; None for bytes); neither for a source that
    records no tokenizer and was given none."""
    if tokenizer is None and not stored.records_tokenizer:
        return None, None
    text = stored.tokenizer(tokenizer)
    record = stored.data if tokenizer is None and stored.data is not None else dataclasses.replace(
        stored.data or DataConfig(), tokenizer=tokenizer or text.name)
    return record, text.file_text


def save_hf_directory(stored: StoredModel, dst: Path, tokenizer: str | None) -> None:
    """`export --format hf` of an opened model, with the tokenizer named or else its run's."""
    text_tokenizer = stored.tokenizer(tokenizer)
    try:
        from moe_diff.hf.export import save_hf
    except ImportError as error:
        raise UsageError(f"--format hf needs transformers: pip install 'moe-diff[hf]' ({error})") from None
    save_hf(stored.model, text_tokenizer, dst)
