"""Hugging Face model directories (config.json and safetensors weights, sharded or not), and the moe-diff model
read from that form without transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from moe_diff.checkpoint.schema import TOKENIZER_FILE, CheckpointError, model_from_state_dict
from moe_diff.config import AUTO_KERNELS, ConfigError, DataConfig, Kernels, ModelConfig
from moe_diff.hf.fields import BASE_MODEL, MODEL_TYPE, model_config_from_fields
from moe_diff.model import MoEDiffTransformer

HF_CONFIG_FILE = "config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
WEIGHT_PREFIX = f"{BASE_MODEL}."


def read_hf_config(directory: Path) -> dict[str, Any]:
    config_path = directory / HF_CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: {HF_CONFIG_FILE} is missing")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{config_path} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_path} holds no JSON object")
    return config


def read_hf_directory(directory: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """config.json and every tensor of the directory's *.safetensors files (one file or shards)."""
    config = read_hf_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{directory} has no *.safetensors files (pickled .bin weights are not "
                              "loaded; convert them to safetensors first)")
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            tensors.update(load_file(path))
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{path} cannot be read as safetensors: {error}") from None
    return config, tensors


def is_moe_diff_directory(directory: Path) -> bool:
    """Whether `directory` holds a config.json of a moe-diff model (an `export --format hf`)."""
    try:
        return read_hf_config(directory).get("model_type") == MODEL_TYPE
    except CheckpointError:
        return False


def stored_model_config(directory: Path, config: dict[str, Any] | None = None) -> ModelConfig:
    """The ModelConfig of an `export --format hf` directory's config.json (`config`, where already read)."""
    try:
        return model_config_from_fields(read_hf_config(directory) if config is None else config)
    except (ConfigError, TypeError) as error:
        raise CheckpointError(f"{directory / HF_CONFIG_FILE} does not map to a valid model: {error}") from None


def load_moe_diff_directory(directory: Path, dtype: torch.dtype | None = None,
                            kernels: Kernels = AUTO_KERNELS) -> MoEDiffTransformer:
    """The model of an `export --format hf` directory (or a transformers `save_pretrained` of one), on `kernels`
    whatever config.json records."""
    config, tensors = read_hf_directory(directory)
    cfg = kernels.on(stored_model_config(directory, config))
    outside = sorted(name for name in tensors if not name.startswith(WEIGHT_PREFIX))
    if outside:
        raise CheckpointError(f"{directory} has tensors outside {WEIGHT_PREFIX!r}: {', '.join(outside[:4])}")
    state = {name.removeprefix(WEIGHT_PREFIX): tensor for name, tensor in tensors.items()}
    if cfg.tie_embeddings:
        state.pop("output.weight", None)  # a tied head, where a writer kept it
    return model_from_state_dict(cfg, state, str(directory), dtype)


def exported_tokenizer(directory: Path) -> DataConfig | None:
    """A data config naming the directory's tokenizer.json and its end-of-text token (tokenizer_config.json's
    eos_token), for the commands that encode text; None without a tokenizer.json."""
    if not (directory / TOKENIZER_FILE).is_file():
        return None
    eos = None
    if (directory / TOKENIZER_CONFIG_FILE).is_file():
        try:
            eos = json.loads((directory / TOKENIZER_CONFIG_FILE).read_text()).get("eos_token")
        except (json.JSONDecodeError, AttributeError):
            raise CheckpointError(f"{directory / TOKENIZER_CONFIG_FILE} holds no valid JSON object") from None
    eos = eos.get("content") if isinstance(eos, dict) else eos
    return DataConfig(tokenizer=str(directory / TOKENIZER_FILE), eot_token=eos)
