"""Checkpoints: the single-file schema (`save`, `load`), resumable training checkpoints, `open_model` for any form,
and Hugging Face Mixtral import and export."""

from moe_diff.checkpoint.mixtral import from_hf_mixtral, to_hf_mixtral
from moe_diff.checkpoint.open import StoredModel, open_model
from moe_diff.checkpoint.schema import CheckpointError, load, save

__all__ = ["CheckpointError", "StoredModel", "from_hf_mixtral", "load", "open_model", "save", "to_hf_mixtral"]
