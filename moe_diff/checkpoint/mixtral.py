"""Import and export of Hugging Face Mixtral checkpoints (standard attention)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from moe_diff.checkpoint.hf_directory import HF_CONFIG_FILE, read_hf_directory
from moe_diff.checkpoint.schema import CheckpointError, model_from_state_dict, model_state_dict, unwrap
from moe_diff.config import ModelConfig
from moe_diff.errors import UsageError
from moe_diff.model import MoEDiffTransformer

# Tensors a Mixtral checkpoint may carry that the model recomputes (old rotary caches).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

# Our attention-block names and theirs.
ATTENTION_NAMES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj"}


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """A standard-attention ModelConfig from a Mixtral `config.json` (transformers 4 or 5)."""
    if hf.get("model_type", "mixtral") != "mixtral":
        raise CheckpointError(f"config.json has model_type={hf['model_type']!r}; only 'mixtral' imports")
    if hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"config.json has hidden_act={hf['hidden_act']!r}; only 'silu' is supported")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise CheckpointError(f"config.json asks for rope_type={rope.get('rope_type', rope.get('type'))!r}; "
                              "only the default rotary embedding is supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in hf]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim"),
            ffn_dim=hf["intermediate_size"],
            n_experts=hf.get("num_local_experts", 8),
            top_k=hf.get("num_experts_per_tok", 2),
            sliding_window=hf.get("sliding_window"),
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 1e6))),
            norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
            max_seq_len=hf.get("max_position_embeddings", 131072),
            attention="standard",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
    except (TypeError, ValueError) as error:  # a ConfigError, or a value that is no number
        raise CheckpointError(f"config.json does not map to a valid model: {error}") from None


def _take(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in tensors:
        raise CheckpointError(f"the Mixtral checkpoint lacks tensor {key!r}")
    return tensors.pop(key)


def _take_experts(tensors: dict[str, torch.Tensor], prefix: str, n_experts: int) -> dict[str, torch.Tensor]:
    """Gate and stacked w1/w2/w3 of one layer, from fused (transformers 5) or per-expert names."""
    fused = prefix + "mlp.experts.gate_up_proj"
    if fused in tensors:
        gate_up = _take(tensors, fused)  # [E, 2F, D]: w1 rows first, then w3
        ffn_dim = gate_up.shape[1] // 2
        return {"moe.gate.weight": _take(tensors, prefix + "mlp.gate.weight"),
                "moe.experts.w1": gate_up[:, :ffn_dim], "moe.experts.w3": gate_up[:, ffn_dim:],
                "moe.experts.w2": _take(tensors, prefix + "mlp.experts.down_proj")}
    moe = prefix + "block_sparse_moe."
    stacked = {f"moe.experts.{w}": torch.stack([_take(tensors, f"{moe}experts.{e}.{w}.weight")
                                                for e in range(n_experts)]) for w in ("w1", "w2", "w3")}
    return {"moe.gate.weight": _take(tensors, moe + "gate.weight"), **stacked}


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Mixtral state dict to our schema; a tensor left unused is an error."""
    tensors = {k: v for k, v in tensors.items() if not k.endswith(IGNORED_SUFFIXES)}
    state = {"tok_embeddings.weight": _take(tensors, "model.embed_tokens.weight")}
    for i in range(cfg.n_layers):
        theirs, ours = f"model.layers.{i}.", f"layers.{i}."
        state[ours + "attention_norm.weight"] = _take(tensors, theirs + "input_layernorm.weight")
        for name, hf_name in ATTENTION_NAMES.items():
            state[f"{ours}attention.{name}.weight"] = _take(tensors, f"{theirs}self_attn.{hf_name}.weight")
        state[ours + "ffn_norm.weight"] = _take(tensors, theirs + "post_attention_layernorm.weight")
        for name, tensor in _take_experts(tensors, theirs, cfg.n_experts).items():
            state[ours + name] = tensor.contiguous()
    state["norm.weight"] = _take(tensors, "model.norm.weight")
    lm_head = tensors.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        state["output.weight"] = lm_head if lm_head is not None else _take(tensors, "lm_head.weight")
    if tensors:
        raise CheckpointError(f"the Mixtral checkpoint has tensors this model does not use: "
                              f"{', '.join(sorted(tensors)[:8])}")
    return state


def from_hf_mixtral(src: nn.Module | str | Path, dtype: torch.dtype | None = None) -> MoEDiffTransformer:
    """A standard-attention model from a transformers MixtralForCausalLM or a checkpoint directory."""
    if isinstance(src, nn.Module):
        hf_config, tensors, source = src.config.to_dict(), dict(src.state_dict()), type(src).__name__
    else:
        hf_config, tensors = read_hf_directory(Path(src))
        source = str(src)
    cfg = model_config_from_hf(hf_config)
    state = state_dict_from_hf(tensors, cfg)
    return model_from_state_dict(cfg, {k: v.detach() for k, v in state.items()}, source, dtype)


def hf_config_from_model(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """A Mixtral config.json readable by transformers 4 (rope_theta) and 5 (rope_parameters)."""
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "sliding_window": cfg.sliding_window,
        "num_local_experts": cfg.n_experts,
        "num_experts_per_tok": cfg.top_k,
        "tie_word_embeddings": cfg.tie_embeddings,
        "dtype": str(dtype).removeprefix("torch."),
    }


def hf_state_dict_from_model(model: MoEDiffTransformer) -> dict[str, torch.Tensor]:
    """Our tensors under Mixtral's per-expert names (what `save_pretrained` writes)."""
    cfg, state = model.cfg, model_state_dict(model)
    out = {"model.embed_tokens.weight": state["tok_embeddings.weight"],
           "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["output.weight"]
    for i in range(cfg.n_layers):
        theirs, ours = f"model.layers.{i}.", f"layers.{i}."
        out[theirs + "input_layernorm.weight"] = state[ours + "attention_norm.weight"]
        out[theirs + "post_attention_layernorm.weight"] = state[ours + "ffn_norm.weight"]
        for name, hf_name in ATTENTION_NAMES.items():
            out[f"{theirs}self_attn.{hf_name}.weight"] = state[f"{ours}attention.{name}.weight"]
        out[theirs + "block_sparse_moe.gate.weight"] = state[ours + "moe.gate.weight"]
        for w in ("w1", "w2", "w3"):
            for e, tensor in enumerate(state[f"{ours}moe.experts.{w}"].unbind(0)):
                out[f"{theirs}block_sparse_moe.experts.{e}.{w}.weight"] = tensor
    return out


def to_hf_mixtral(model: nn.Module, directory: str | Path) -> Path:
    """Write `config.json` and `model.safetensors` that transformers' Mixtral loads."""
    model = unwrap(model)
    if model.cfg.attention != "standard":
        raise UsageError(f"only standard-attention models export to Mixtral; this model has "
                         f"attention={model.cfg.attention!r}, which Mixtral cannot represent")
    directory = Path(directory)
    if model.cfg.expert_bias_rate:
        raise UsageError("this model selects experts with a learned bias (model.expert_bias_rate > 0), which "
                         "Mixtral's router cannot represent; exporting would change which experts every token uses")
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} exists and is not empty; refusing to overwrite it")
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in hf_state_dict_from_model(model).items()}
    dtype = model.tok_embeddings.weight.dtype
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / HF_CONFIG_FILE).write_text(json.dumps(hf_config_from_model(model.cfg, dtype), indent=2))
    return directory
