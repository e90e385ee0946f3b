"""Open a model from any checkpoint form: a single-file checkpoint, a training checkpoint `step-N` (whatever
layout wrote it), a run directory (its newest checkpoint that verifies), or an `export --format hf` directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from moe_diff.checkpoint import schema
from moe_diff.checkpoint.hf_directory import exported_tokenizer, is_moe_diff_directory, load_moe_diff_directory
from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.checkpoint.training import (
    STATE,
    SafeFileSystemReader,
    check_coverage,
    check_experts,
    expert_checksums,
    newest_valid,
    quiet_dcp,
    refuse_old_layout,
    verify,
)
from moe_diff.config import DataConfig
from moe_diff.data import Tokenizer, load_tokenizer
from moe_diff.errors import UsageError
from moe_diff.model import MoEDiffTransformer
from moe_diff.runs import CHECKPOINTS_DIR


@dataclass
class StoredModel:
    """A model read from any checkpoint form, with where it came from."""

    model: MoEDiffTransformer
    path: Path  # the checkpoint directory read
    run_dir: Path | None = None  # the training run that wrote it
    data: DataConfig | None = None  # that run's data config
    skipped: list[str] = field(default_factory=list)  # why each newer checkpoint of the run was not used

    def notes(self) -> list[str]:
        """What a command tells its user before it works with the model: the checkpoints it skipped and why, and
        the one it opened."""
        return [f"skipping checkpoint: {note}" for note in self.skipped] + [f"opened {self.path}"]

    def tokenizer(self, name: str | None = None) -> Tokenizer:
        """The tokenizer named ('byte' or a tokenizer.json), or else the one of the model's run or exported
        directory; a UsageError when there is neither."""
        if name is None and self.data is None:
            raise UsageError(f"{self.path} has no data config to take the tokenizer from; pass --tokenizer byte or "
                             "--tokenizer PATH/tokenizer.json (the one the model was trained with)")
        return load_tokenizer(self.data if name is None else DataConfig(tokenizer=name))


def open_model(path: str | Path, dtype: torch.dtype | None = None, tell: Callable[[str], None] | None = None
               ) -> StoredModel:
    """The whole model of a `checkpoint.save` directory, of a training checkpoint `step-N` (whatever layout wrote
    it; experts checked against its table), of a run's out_dir (its newest valid checkpoint) or of an
    `export --format hf` directory (with its tokenizer as the data config), in this process.
    `tell`, if given, hears StoredModel.notes(): the newer checkpoints skipped and why, and the one opened."""
    stored = _read(Path(path), dtype)
    for note in stored.notes() if tell is not None else ():
        tell(note)
    return stored


def _read(path: Path, dtype: torch.dtype | None) -> StoredModel:
    if (path / schema.CONFIG_FILE).is_file() and (path / schema.WEIGHTS_FILE).is_file():
        return StoredModel(schema.load(path, dtype=dtype), path)
    if is_moe_diff_directory(path):
        return StoredModel(load_moe_diff_directory(path, dtype), path, data=exported_tokenizer(path))
    skipped: list[str] = []
    if (path / CHECKPOINTS_DIR).is_dir():
        newest, skipped = newest_valid(path / CHECKPOINTS_DIR)  # verified
        if newest is None:
            reasons = "".join(f"; {note}" for note in skipped)
            raise CheckpointError(f"{path} is a run directory without a valid checkpoint{reasons}")
        path = newest
    elif (path / STATE).is_dir():
        verify(path)
    if not (path / STATE).is_dir() or not (path / schema.CONFIG_FILE).is_file():
        refuse_old_layout(path)
        raise CheckpointError(f"{path} is not a checkpoint, a training checkpoint, a run directory or an "
                              "exported transformers directory")
    cfg = schema.load_model_config(path)
    reader = SafeFileSystemReader(path / STATE)
    metadata = reader.read_metadata()
    check_coverage(metadata, path)
    stored, shapes = metadata.state_dict_metadata, schema.expected_shapes(cfg)
    missing = [f"model.{name}" for name in shapes if f"model.{name}" not in stored]
    if missing:
        raise CheckpointError(f"{path} does not match its config: {', '.join(missing[:4])} missing")
    state = {name: torch.empty(shape, dtype=stored[f"model.{name}"].properties.dtype) for name, shape in shapes.items()}
    quiet_dcp(dcp.load, {"model": state}, False, path, storage_reader=reader)
    model = schema.model_from_state_dict(cfg, state, str(path / STATE), dtype=None)
    check_experts(path, expert_checksums(model))
    if dtype is not None:
        model = model.to(dtype)
    data = schema.load_config_section(path, "data", required=False)
    return StoredModel(model, path, path.parent.parent, data, skipped)
