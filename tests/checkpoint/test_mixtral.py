"""Mixtral import and export, with transformers' MixtralForCausalLM as the oracle."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moe_diff.checkpoint import CheckpointError
from moe_diff.checkpoint.mixtral import from_hf_mixtral, to_hf_mixtral

transformers = pytest.importorskip("transformers")


def hf_mixtral(sliding_window: int | None = 5, head_dim: int | None = 24, **extra):
    """A small random Mixtral: GQA 2:1 and, by default, a window shorter than the test sequences."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=97, hidden_size=64, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=head_dim, sliding_window=sliding_window, num_local_experts=4,
        num_experts_per_tok=2, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        max_position_embeddings=64, attn_implementation="eager", **extra)
    model = transformers.MixtralForCausalLM(config).eval()
    with torch.no_grad():  # router weights large enough that routing differs between tokens
        for layer in model.model.layers:
            layer.mlp.gate.weight.normal_(0, 0.5)
    return model


def hf_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits


TOKENS = torch.randint(0, 97, (2, 17), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_import_from_module_matches_transformers(sliding_window: int | None) -> None:
    hf = hf_mixtral(sliding_window)
    ours = from_hf_mixtral(hf)
    assert ours.cfg.attention == "standard" and ours.cfg.sliding_window == sliding_window
    torch.testing.assert_close(ours(TOKENS).logits, hf_logits(hf, TOKENS), rtol=1e-5, atol=1e-5)


def test_import_of_saved_directory_with_per_expert_names(tmp_path: Path) -> None:
    hf = hf_mixtral()
    hf.save_pretrained(tmp_path)
    torch.testing.assert_close(from_hf_mixtral(tmp_path)(TOKENS).logits, hf_logits(hf, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_import_of_fused_names_and_transformers5_config(tmp_path: Path) -> None:
    """Fused gate_up_proj/down_proj tensors, rope_theta under rope_parameters, head_dim null."""
    hf = hf_mixtral(head_dim=None)
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "model.safetensors")
    config = hf.config.to_dict() | {"head_dim": None}
    config.pop("rope_theta", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    ours = from_hf_mixtral(tmp_path)
    assert ours.cfg.rope_theta == 500.0 and ours.cfg.resolved_head_dim == 16
    torch.testing.assert_close(ours(TOKENS).logits, hf_logits(hf, TOKENS), rtol=1e-5, atol=1e-5)


def test_export_loads_in_transformers_and_round_trips(tmp_path: Path) -> None:
    hf = hf_mixtral()
    ours = from_hf_mixtral(hf)
    to_hf_mixtral(ours, tmp_path / "export")
    reloaded = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "export",
                                                               attn_implementation="eager").eval()
    expected = hf_logits(hf, TOKENS)
    torch.testing.assert_close(hf_logits(reloaded, TOKENS), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(from_hf_mixtral(tmp_path / "export")(TOKENS).logits, expected,
                               rtol=1e-5, atol=1e-5)


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    hf = hf_mixtral(tie_word_embeddings=True)
    ours = from_hf_mixtral(hf)
    assert ours.cfg.tie_embeddings
    to_hf_mixtral(ours, tmp_path)
    torch.testing.assert_close(from_hf_mixtral(tmp_path)(TOKENS).logits, hf_logits(hf, TOKENS),
                               rtol=1e-5, atol=1e-5)


def test_export_refuses_diff_models_and_non_empty_directories(tmp_path: Path) -> None:
    from moe_diff.config import ModelConfig
    from moe_diff.model import MoEDiffTransformer

    diff = MoEDiffTransformer(ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                          ffn_dim=8, n_experts=2, top_k=1))
    with pytest.raises(ValueError, match="attention='diff'"):
        to_hf_mixtral(diff, tmp_path / "out")
    biased = MoEDiffTransformer(ModelConfig(vocab_size=10, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                            ffn_dim=8, n_experts=2, top_k=1, attention="standard",
                                            expert_bias_rate=0.01))
    with pytest.raises(ValueError, match="expert_bias_rate"):
        to_hf_mixtral(biased, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        to_hf_mixtral(from_hf_mixtral(hf_mixtral()), tmp_path / "full")


def write_hf_directory(directory: Path, hf, edit_state=None, edit_config=None) -> None:
    hf.save_pretrained(directory)
    if edit_state:
        from safetensors.torch import load_file

        state = load_file(directory / "model.safetensors")
        edit_state(state)
        save_file(state, directory / "model.safetensors")
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        edit_config(config)
        (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(("edit_state", "edit_config", "needle"), [
    (lambda s: s.pop("model.layers.1.block_sparse_moe.experts.3.w2.weight"), None,
     "lacks tensor 'model.layers.1.block_sparse_moe.experts.3.w2.weight'"),
    (lambda s: s.update({"model.layers.0.self_attn.q_proj.bias": torch.zeros(96)}), None,
     "does not use: model.layers.0.self_attn.q_proj.bias"),
    (None, lambda c: c.update(hidden_act="gelu"), "hidden_act='gelu'"),
    (None, lambda c: c.update(model_type="llama"), "model_type='llama'"),
    (None, lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1.0}), "rope_type='yarn'"),
    (None, lambda c: c.update(num_key_value_heads=3), "model.n_kv_heads=3"),
    (lambda s: s.update({"model.norm.weight": torch.ones(3)}), None,
     "key 'norm.weight' has shape [3], expected [64]"),
])
def test_bad_mixtral_directories_are_refused_by_name(tmp_path: Path, edit_state, edit_config, needle) -> None:
    write_hf_directory(tmp_path, hf_mixtral(), edit_state, edit_config)
    with pytest.raises(CheckpointError) as error:
        from_hf_mixtral(tmp_path)
    assert needle in str(error.value)


def test_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        from_hf_mixtral(tmp_path)
    with pytest.raises(CheckpointError, match="config.json is missing"):
        from_hf_mixtral(tmp_path / "nowhere")
