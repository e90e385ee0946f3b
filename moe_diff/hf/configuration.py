"""The transformers config of a moe-diff model: the ModelConfig fields as config.json stores them, readable under
transformers' usual names too (hidden_size, num_hidden_layers, ...), validated by ModelConfig."""

from __future__ import annotations

from typing import Any

from transformers import PretrainedConfig

from moe_diff.config import ModelConfig, without_kernels
from moe_diff.hf.fields import MODEL_TYPE, STORED_FIELDS, config_fields, model_config_from_fields


class MoeDiffConfig(PretrainedConfig):
    """A ModelConfig as a transformers config; `model_config()` gives the ModelConfig back."""

    model_type = MODEL_TYPE
    attribute_map = {
        "hidden_size": "dim", "num_hidden_layers": "n_layers", "num_attention_heads": "n_heads",
        "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_dim", "num_local_experts": "n_experts",
        "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "tie_word_embeddings": "tie_embeddings",
    }

    def __init__(self, **kwargs: Any):
        for theirs, ours in self.attribute_map.items():
            if theirs in kwargs:
                kwargs.setdefault(ours, kwargs.pop(theirs))
        fields = config_fields(model_config_from_fields(kwargs))  # validated: a ConfigError names a bad field
        for name, value in fields.items():
            kwargs.pop(name, None)
            setattr(self, name, value)
        self.use_cache = kwargs.pop("use_cache", True)  # generation keeps a KV cache
        self.output_router_logits = kwargs.pop("output_router_logits", False)  # and the aux loss
        super().__init__(**kwargs)

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **kwargs: Any) -> MoeDiffConfig:
        """The config of a config.json (what from_pretrained reads): the kernels it records are the exporter's, not
        this machine's, so the model runs on `auto` unless from_pretrained is given attn_backend= or moe_backend=."""
        return super().from_dict(without_kernels(config_dict), **kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> MoeDiffConfig:
        return cls(**config_fields(cfg), **kwargs)

    def model_config(self) -> ModelConfig:
        return model_config_from_fields({name: getattr(self, name) for name in STORED_FIELDS})


import moe_diff.hf.modeling  # noqa: E402, F401  (registers this class and the model with the Auto classes)
