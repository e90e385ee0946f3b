"""Open a model from any checkpoint form: a single-file checkpoint, a training checkpoint `step-N` (whatever
layout wrote it), a run directory (its newest checkpoint that verifies), or an `export --format hf` directory."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from moe_diff.checkpoint import experts, schema
from moe_diff.checkpoint.hf_directory import exported_tokenizer, is_moe_diff_directory, load_moe_diff_directory
from moe_diff.checkpoint.schema import TOKENIZER_FILE, CheckpointError
from moe_diff.checkpoint.training import (
    STATE,
    SafeFileSystemReader,
    check_coverage,
    newest_valid,
    quiet_dcp,
    refuse_old_layout,
    verify,
)
from moe_diff.config import AUTO_KERNELS, DataConfig, Kernels
from moe_diff.data import Tokenizer, check_vocabulary, load_tokenizer
from moe_diff.errors import UsageError
from moe_diff.model import MoEDiffTransformer
from moe_diff.runs import CHECKPOINTS_DIR


@dataclass
class StoredModel:
    """A model read from any checkpoint form, with where it came from."""

    model: MoEDiffTransformer
    path: Path  # the checkpoint directory read
    run_dir: Path | None = None  # the training run that wrote it
    data: DataConfig | None = None  # the data config stored with it (its run's)
    skipped: list[str] = field(default_factory=list)  # why each newer checkpoint of the run was not used

    def notes(self) -> list[str]:
        """What a command tells its user before it works with the model: the checkpoints it skipped and why, and
        the one it opened."""
        return [f"skipping checkpoint: {note}" for note in self.skipped] + [f"opened {self.path}"]

    @property
    def records_tokenizer(self) -> bool:
        """Whether the checkpoint says which tokenizer its model reads: a tokenizer.json of its own, or its run's
        data config."""
        return (self.path / TOKENIZER_FILE).is_file() or self.data is not None

    def tokenizer(self, name: str | None = None) -> Tokenizer:
        """The tokenizer of the model's text, checked against its vocabulary: the one named ('byte' or a
        tokenizer.json) where given, else the checkpoint's own tokenizer.json, else its run's data.tokenizer; a
        UsageError saying which flag to give when there is none of them."""
        eot_token = self.data.eot_token if self.data is not None else None
        if name is not None:
            data = DataConfig(tokenizer=name, eot_token=eot_token)
        elif (self.path / TOKENIZER_FILE).is_file():
            data = DataConfig(tokenizer=str(self.path / TOKENIZER_FILE), eot_token=eot_token)
        elif self.data is None:
            raise UsageError(f"{self.path} records no tokenizer: pass --tokenizer byte if the model was trained on "
                             "bytes, or --tokenizer PATH/tokenizer.json (the one it was trained with)")
        elif self.data.tokenizer != "byte" and not Path(self.data.tokenizer).is_file():
            raise UsageError(f"{self.path} was trained with data.tokenizer={self.data.tokenizer!r}, which is not "
                             "here: pass --tokenizer PATH/tokenizer.json (that file)")
        else:
            data = self.data
        tokenizer = load_tokenizer(data)
        check_vocabulary(self.model.cfg.vocab_size, tokenizer)
        return tokenizer


def open_model(path: str | Path, dtype: torch.dtype | None = None, tell: Callable[[str], None] | None = None,
               kernels: Kernels = AUTO_KERNELS) -> StoredModel:
    """The whole model of a `checkpoint.save` directory, of a training checkpoint `step-N` (whatever layout wrote
    it; experts checked against its table), of a run's out_dir (its newest valid checkpoint) or of an
    `export --format hf` directory (with its tokenizer as the data config), in this process, on `kernels` whatever
    kernels wrote it. `tell`, if given, hears StoredModel.notes(): the newer checkpoints skipped and why, and the
    one opened."""
    stored = _read(Path(path), dtype, kernels)
    for note in stored.notes() if tell is not None else ():
        tell(note)
    return stored


def _read(path: Path, dtype: torch.dtype | None, kernels: Kernels) -> StoredModel:
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / schema.CONFIG_FILE).is_file() and (path / schema.WEIGHTS_FILE).is_file():
        return StoredModel(schema.load(path, dtype=dtype, kernels=kernels), path,
                           data=schema.load_config_section(path, "data", required=False))
    if is_moe_diff_directory(path):
        return StoredModel(load_moe_diff_directory(path, dtype, kernels), path, data=exported_tokenizer(path))
    skipped: list[str] = []
    if (path / CHECKPOINTS_DIR).is_dir():
        newest, failed = newest_valid(path / CHECKPOINTS_DIR)  # verified
        skipped = list(failed.values())
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
    cfg = kernels.on(schema.load_model_config(path))
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
    experts.check(path, model)
    if dtype is not None:
        model = model.to(dtype)
    data = schema.load_config_section(path, "data", required=False)
    return StoredModel(model, path, path.parent.parent, data, skipped)
