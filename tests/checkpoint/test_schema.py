"""Checkpoint schema and files: round trips exactly, and refuses anything that does not match."""

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from moe_diff.checkpoint import CheckpointError
from moe_diff.checkpoint import schema as checkpoint
from moe_diff.config import ModelConfig
from moe_diff.model import MoEDiffTransformer


def small_model(attention: str = "diff", tie: bool = False) -> MoEDiffTransformer:
    torch.manual_seed(0)
    return MoEDiffTransformer(ModelConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                          ffn_dim=48, n_experts=4, sliding_window=4, attention=attention,
                                          tie_embeddings=tie, max_seq_len=64))


def schema_as_documented(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The README's table of keys and shapes, written out independently of the model."""
    d, D, E, Fd = cfg.resolved_head_dim, cfg.dim, cfg.n_experts, cfg.ffn_dim
    query_heads = 2 * cfg.n_heads if cfg.attention == "diff_v2" else cfg.n_heads
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, D)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attention_norm.weight"] = (D,)
        shapes[p + "attention.wq.weight"] = (query_heads * d, D)
        shapes[p + "attention.wk.weight"] = (cfg.n_kv_heads * d, D)
        shapes[p + "attention.wv.weight"] = (cfg.n_kv_heads * d, D)
        shapes[p + "attention.wo.weight"] = (D, cfg.n_heads * d)
        if cfg.attention == "diff":
            for name in ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2"):
                shapes[p + "attention." + name] = (d,)
            shapes[p + "attention.subln.weight"] = (2 * d,)
        if cfg.attention == "diff_v2":
            shapes[p + "attention.lambda_proj.weight"] = (cfg.n_heads, D)
        shapes[p + "ffn_norm.weight"] = (D,)
        if cfg.expert_bias_rate:
            shapes[p + "moe.expert_bias"] = (E,)
        shapes[p + "moe.gate.weight"] = (E, D)
        shapes[p + "moe.experts.w1"] = (E, Fd, D)
        shapes[p + "moe.experts.w2"] = (E, D, Fd)
        shapes[p + "moe.experts.w3"] = (E, Fd, D)
    shapes["norm.weight"] = (D,)
    if not cfg.tie_embeddings:
        shapes["output.weight"] = (cfg.vocab_size, D)
    return shapes


@pytest.mark.parametrize("attention", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("bias", [0.0, 0.01])
def test_the_schema_is_the_documented_one(attention: str, tie: bool, bias: float) -> None:
    cfg = dataclasses.replace(small_model(attention, tie).cfg, expert_bias_rate=bias)
    shapes = checkpoint.expected_shapes(cfg)
    assert shapes == schema_as_documented(cfg)
    assert ("output.weight" in shapes) is not tie


@pytest.mark.parametrize("attention", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize("tie", [False, True])
def test_round_trip_reproduces_weights_and_logits(tmp_path: Path, attention: str, tie: bool) -> None:
    model = small_model(attention, tie).double()
    checkpoint.save(model, tmp_path / "ckpt")
    loaded = checkpoint.load(tmp_path / "ckpt")
    assert loaded.cfg == model.cfg
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert (loaded.output.weight is loaded.tok_embeddings.weight) is tie
    tokens = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(loaded(tokens).logits, model(tokens).logits, rtol=0, atol=1e-12)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.yaml", "model.safetensors"]


def test_load_casts_on_request_and_saves_unwrapped_compiled_model(tmp_path: Path) -> None:
    model = small_model()
    checkpoint.save(torch.compile(model), tmp_path / "ckpt")  # no `_orig_mod.` prefixes in keys
    assert all(not k.startswith("_orig_mod") for k in load_file(tmp_path / "ckpt" / "model.safetensors"))
    assert checkpoint.load(tmp_path / "ckpt", dtype=torch.bfloat16).norm.weight.dtype == torch.bfloat16


def test_overwrite_replaces_whole_and_leaves_no_staging(tmp_path: Path) -> None:
    checkpoint.save(small_model("diff"), tmp_path / "ckpt")
    checkpoint.save(small_model("standard"), tmp_path / "ckpt")
    assert checkpoint.load(tmp_path / "ckpt").cfg.attention == "standard"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_refuses_to_replace_a_directory_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "notes.txt").write_text("precious")
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        checkpoint.save(small_model(), tmp_path / "data")
    assert (tmp_path / "data" / "notes.txt").read_text() == "precious"


def rewrite_weights(directory: Path, edit) -> None:
    path = directory / "model.safetensors"
    state = load_file(path)
    edit(state)
    save_file(state, path)


@pytest.mark.parametrize(("edit", "needle"), [
    (lambda s: s.pop("layers.1.moe.experts.w2"), "missing key 'layers.1.moe.experts.w2'"),
    (lambda s: s.update(extra=torch.zeros(1)), "unexpected key 'extra'"),
    (lambda s: s.update({"layers.0.attention.lambda_q1": torch.zeros(3)}),
     "key 'layers.0.attention.lambda_q1' has shape [3], expected [8]"),
])
def test_mismatched_weights_are_refused_by_name(tmp_path: Path, edit, needle: str) -> None:
    checkpoint.save(small_model(), tmp_path / "ckpt")
    rewrite_weights(tmp_path / "ckpt", edit)
    with pytest.raises(CheckpointError) as error:
        checkpoint.load(tmp_path / "ckpt")
    assert needle in str(error.value)


def test_broken_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="config.yaml is missing"):
        checkpoint.load(tmp_path)
    checkpoint.save(small_model(), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])  # a half-written file
    with pytest.raises(CheckpointError, match="cannot be read as safetensors"):
        checkpoint.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text("model:\n  top_k: 99\n")
    with pytest.raises(CheckpointError, match="model.top_k=99"):
        checkpoint.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.yaml").write_text("[unclosed")
    with pytest.raises(CheckpointError, match="not valid YAML"):
        checkpoint.load(tmp_path / "ckpt")


def test_standard_checkpoint_seeds_a_diff_model() -> None:
    """Attention shapes are shared, so a standard model's weights load into a diff model."""
    standard, diff = small_model("standard"), small_model("diff")
    missing, unexpected = diff.load_state_dict(standard.state_dict(), strict=False)
    assert unexpected == [] and all("lambda_" in k or "subln" in k for k in missing)
