"""Config loading: YAML plus dotlist overrides, and errors that name the field and what is allowed."""

import re
from pathlib import Path

import pytest

from moe_diff.config import ATTENTION_MODES, ConfigError, ModelConfig, load_config, to_yaml

CONFIGS = Path(__file__).parents[1] / "configs"


@pytest.mark.parametrize("name", ["tiny", "small", "mixtral-8x7b-diff"])
def test_shipped_configs_load(name: str) -> None:
    assert load_config(CONFIGS / f"{name}.yaml").model.attention in ATTENTION_MODES


def test_mixtral_shapes() -> None:
    cfg = load_config(CONFIGS / "mixtral-8x7b-diff.yaml").model
    assert (cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim, cfg.ffn_dim,
            cfg.sliding_window) == (4096, 32, 32, 8, 128, 14336, 4096)


def test_defaults_are_the_documented_ones() -> None:
    cfg = ModelConfig()
    assert (cfg.vocab_size, cfg.dim, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (
        32000, 4096, 32, 32, 8, None)
    assert (cfg.ffn_dim, cfg.n_experts, cfg.top_k, cfg.sliding_window, cfg.rope_theta) == (
        14336, 8, 2, None, 1e6)
    assert (cfg.norm_eps, cfg.max_seq_len, cfg.attention, cfg.attn_backend, cfg.moe_backend) == (
        1e-5, 32768, "diff", "auto", "auto")
    assert (cfg.router_aux_loss_coef, cfg.router_z_loss_coef, cfg.tie_embeddings) == (0.02, 0.001, False)
    assert cfg.resolved_head_dim == 128


def test_overrides_apply_and_head_dim_follows_dim(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.n_layers=2", "model.sliding_window=null"]).model
    assert cfg.n_layers == 2 and cfg.sliding_window is None
    cfg = load_config(None, ["model.dim=256", "model.n_heads=4", "model.n_kv_heads=2"]).model
    assert cfg.head_dim is None and cfg.resolved_head_dim == 64


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = load_config(CONFIGS / "tiny.yaml", ["model.attention=diff_v2"]).model
    (tmp_path / "c.yaml").write_text(to_yaml(cfg))
    assert load_config(tmp_path / "c.yaml").model == cfg


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.n_kv_heads=3"], "model.n_kv_heads=3 is not allowed: a divisor of n_heads"),
    (["model.n_heads=6", "model.n_kv_heads=3", "model.head_dim=64"],
     "'diff' needs even n_heads and n_kv_heads"),
    (["model.top_k=9"], "model.top_k=9 is not allowed: an integer from 1 to n_experts (8)"),
    (["model.top_k=0"], "model.top_k=0"),
    (["model.sliding_window=0"], "model.sliding_window=0 is not allowed: null"),
    (["model.attention=linear"], "one of diff, diff_v2, standard"),
    (["model.attn_backend=cuda"], "model.attn_backend='cuda' is not allowed: one of reference"),
    (["model.moe_backend=x"], "model.moe_backend='x'"),
    (["model.moe_backend=grouped_mm", "model.ffn_dim=100"], "needs dim and ffn_dim divisible by 8"),
    (["model.head_dim=7"], "model.head_dim=7 is not allowed: an even integer"),
    (["model.n_heads=5", "model.n_kv_heads=1", "model.attention=standard", "model.head_dim=null"],
     "set head_dim explicitly"),
    (["model.dim=0"], "model.dim=0 is not allowed: a positive integer"),
    (["model.norm_eps=-1"], "model.norm_eps=-1.0 is not allowed: a positive finite number"),
    (["model.router_z_loss_coef=-0.1"], "model.router_z_loss_coef=-0.1"),
    (["model.n_layerz=2"], "unknown config key 'model.n_layerz' (did you mean 'model.n_layers'?); keys of model: "
                           "vocab_size, dim, n_layers,"),
    (["optim.lr=1"], "unknown config key 'optim.lr' (did you mean 'train.lr'?); keys of train: out_dir,"),
    (["xyz.abc=1"], "unknown config key 'xyz.abc'; the sections are model, train, data, parallel"),
    (["model.dim=big"], "model.dim='big' is not allowed: an integer, e.g. model.dim=4096"),
    (["model.sliding_window=abc"], "model.sliding_window='abc' is not allowed: an integer or null"),
    (["train.out_dir="], "train.out_dir=null is not allowed: a string, e.g. train.out_dir=runs/default"),
    (["train.out_dir=''"], "train.out_dir='' is not allowed: a directory path"),
    (["model.n_layers"], "is not of the form section.key=value"),
])
def test_bad_values_name_the_field(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        load_config(CONFIGS / "tiny.yaml", overrides)
    assert needle in str(error.value)


def test_diff_v2_allows_odd_head_counts() -> None:
    cfg = ModelConfig(dim=96, n_heads=3, n_kv_heads=1, attention="diff_v2")
    assert cfg.resolved_head_dim == 32


def test_python_construction_validates() -> None:
    with pytest.raises(ConfigError, match="model.top_k=3"):
        ModelConfig(n_experts=2, top_k=3)


def test_missing_file_and_unknown_yaml_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model:\n  dim: 64\n  experts: 4\n")
    with pytest.raises(ConfigError, match="unknown config key 'model.experts'"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize(("overrides", "needle"), [
    (["parallel.ep=3"], "parallel.ep=3 is not allowed: a divisor of model.n_experts (8)"),
    (["parallel.tp=0"], "parallel.tp=0"),
    (["parallel.dp=0"], "parallel.dp=0"),
    (["parallel.vocab_parallel=true"], "parallel.vocab_parallel=True is not allowed: true or false (true only with"),
])
def test_parallel_section_is_checked(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        load_config(CONFIGS / "tiny.yaml", overrides)
