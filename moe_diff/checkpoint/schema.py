"""The checkpoint schema and its files: `config.yaml` + `model.safetensors` in one directory."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from moe_diff.config import (
    AUTO_KERNELS,
    ConfigError,
    DataConfig,
    Kernels,
    ModelConfig,
    section_from_dict,
    to_yaml,
    without_kernels,
)
from moe_diff.errors import MoeDiffError
from moe_diff.model import MoEDiffTransformer

CONFIG_FILE = "config.yaml"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"  # the tokenizer stored with a checkpoint, read before its run's data.tokenizer


class CheckpointError(MoeDiffError, ValueError):
    """A checkpoint directory that is missing, malformed or does not match its config."""


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the schema with its shape, in the order of the model's state dict: read off the model
    itself, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = MoEDiffTransformer(cfg)
    return {name: tuple(value.shape) for name, value in model_state_dict(model).items()}


def check_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig, source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or mis-shaped key."""
    expected = expected_shapes(cfg)
    problems = [f"missing key {k!r} (expected shape {list(s)})" for k, s in expected.items()
                if k not in state]
    problems += [f"unexpected key {k!r}" for k in state if k not in expected]
    problems += [f"key {k!r} has shape {list(state[k].shape)}, expected {list(expected[k])}"
                 for k in state if k in expected and tuple(state[k].shape) != expected[k]]
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise CheckpointError(f"{source} does not match its config: {shown}")


def unwrap(model: nn.Module) -> MoEDiffTransformer:
    """The plain model inside torch.compile (`_orig_mod`) or DDP/FSDP-style (`module`) wrappers."""
    while not isinstance(model, MoEDiffTransformer):
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if inner is None:
            raise TypeError(f"expected a MoEDiffTransformer, got {type(model).__name__}")
        model = inner
    return model


def model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under the schema's keys (a tied output head is left out)."""
    model = unwrap(model)
    state = model.state_dict()
    if model.cfg.tie_embeddings:
        del state["output.weight"]
    return state


def save(model: nn.Module, directory: str | Path, data: DataConfig | None = None,
         tokenizer_json: str | None = None) -> Path:
    """Write `config.yaml` and `model.safetensors`; an existing checkpoint there is replaced whole. `data` (the
    tokenizer the model reads and writes text with, and where its training text came from) goes into config.yaml,
    and its tokenizer.json beside the weights: `tokenizer_json` (the text as read before), else the file that
    data.tokenizer names."""
    if tokenizer_json is None and data is not None and data.tokenizer != "byte":
        tokenizer_json = read_tokenizer_json(Path(data.tokenizer))
    model = unwrap(model)
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous() for k, v in model_state_dict(model).items()}
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        (staging / CONFIG_FILE).write_text(to_yaml(model.cfg, data))
        store_tokenizer(tokenizer_json, staging)
        save_file(state, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        replace_directory(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def read_tokenizer_json(path: Path) -> str:
    """A tokenizer.json's text as it is (newlines kept); CheckpointError where it is not UTF-8."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not a tokenizer.json: not UTF-8 text") from None


def store_tokenizer(tokenizer_json: str | None, directory: Path) -> None:
    """Write a tokenizer.json's text (None: a model of bytes, nothing to write) into a checkpoint directory, which
    then reads its text with it wherever it goes."""
    if tokenizer_json is not None:
        (directory / TOKENIZER_FILE).write_bytes(tokenizer_json.encode("utf-8"))


def replace_directory(staging: Path, directory: Path) -> None:
    """Swap a fully written staging directory into place, keeping the old one until it succeeds."""
    if not directory.exists():
        os.replace(staging, directory)
        return
    if not (directory / CONFIG_FILE).is_file() and any(directory.iterdir()):
        raise CheckpointError(f"{directory} exists and is not a checkpoint directory; refusing to "
                              "replace it")
    retired = directory.with_name(f".{directory.name}.old")
    shutil.rmtree(retired, ignore_errors=True)
    os.replace(directory, retired)
    os.replace(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


def load_config_section(directory: str | Path, section: str = "model", required: bool = True) -> Any:
    """A validated section of a checkpoint's config.yaml (None where `required` is false and it is absent);
    CheckpointError naming the file otherwise."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict) or (required and not isinstance(values.get(section), dict)):
        raise CheckpointError(f"{path} has no '{section}:' section")
    if section not in values:
        return None
    stored = values[section]
    if section == "model" and isinstance(stored, dict):  # the kernels a run used are a record, not part of the model
        stored = without_kernels(stored)
    try:
        return section_from_dict(section, stored)
    except ConfigError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_model_config(directory: str | Path) -> ModelConfig:
    """The stored model, on the default kernels (`auto`) whatever kernels wrote it."""
    return load_config_section(directory, "model")


def read_weights(directory: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of `model.safetensors` in a checkpoint directory (not yet checked against a config)."""
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {WEIGHTS_FILE} is missing")
    try:
        return load_file(path, device=str(device))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path} cannot be read as safetensors: {error}") from None


def load(directory: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
         kernels: Kernels = AUTO_KERNELS) -> MoEDiffTransformer:
    """Read a checkpoint written by `save`, on `kernels`; weights keep their saved dtype unless `dtype` is given."""
    cfg = kernels.on(load_model_config(directory))
    state = read_weights(directory, device)
    return model_from_state_dict(cfg, state, source=str(Path(directory) / WEIGHTS_FILE), dtype=dtype)


def _with_tied_output(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    if not cfg.tie_embeddings:
        return state
    return {**state, "output.weight": state["tok_embeddings.weight"]}


def model_from_state_dict(cfg: ModelConfig, state: dict[str, torch.Tensor], source: str,
                          dtype: torch.dtype | None = None) -> MoEDiffTransformer:
    """Build a model whose parameters are exactly `state` (checked against the schema first)."""
    check_state_dict(state, cfg, source)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    with torch.device("meta"):
        model = MoEDiffTransformer(cfg)
    model.load_state_dict(_with_tied_output(state, cfg), strict=True, assign=True)
    if cfg.tie_embeddings:
        model.output.weight = model.tok_embeddings.weight
    return model
