"""How a transformers directory names a moe-diff model's config fields and weights (transformers-free: the
checkpoint readers use it too)."""

from __future__ import annotations

import dataclasses
from typing import Any

from moe_diff.config import ModelConfig

MODEL_TYPE = "moe_diff"  # config.json's model_type of a moe-diff model
BASE_MODEL = "model"  # the transformers model holds the project's model under this name: weights "model.*"
MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(ModelConfig))
# ModelConfig fields that config.json stores under another name: transformers reads `top_k` as a sampling setting
STORED_AS = {"top_k": "num_experts_per_tok"}
STORED_FIELDS = tuple(STORED_AS.get(name, name) for name in MODEL_FIELDS)


def config_fields(cfg: ModelConfig) -> dict[str, Any]:
    """A ModelConfig's fields as config.json stores them."""
    return {STORED_AS.get(name, name): value for name, value in dataclasses.asdict(cfg).items()}


def model_config_from_fields(values: dict[str, Any]) -> ModelConfig:
    """The ModelConfig of config.json's fields (others ignored); ConfigError names a bad one."""
    return ModelConfig(**{name: values[stored] for name, stored in zip(MODEL_FIELDS, STORED_FIELDS, strict=True)
                          if stored in values})
