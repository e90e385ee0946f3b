"""The public API (`import moe_diff`) is the contract for scripts and notebooks: every name it lists exists, and the
life of a model runs through those names alone."""

from pathlib import Path

import pytest
import torch

import moe_diff

CONTRACT = {"ModelConfig", "Config", "load_config", "MoEDiffTransformer", "save", "load", "open_model",
            "from_hf_mixtral", "to_hf_mixtral", "generate", "stream", "MoeDiffError", "ConfigError",
            "CheckpointError"}


def test_the_contract_is_exported() -> None:
    assert CONTRACT <= set(moe_diff.__all__)
    assert all(hasattr(moe_diff, name) for name in moe_diff.__all__)


def test_a_model_from_config_to_tokens_through_the_public_names(tmp_path: Path) -> None:
    cfg = moe_diff.load_config(Path(__file__).parents[1] / "configs" / "tiny.yaml",
                               ["model.n_layers=1", "model.attention=standard"])
    torch.manual_seed(0)
    model = moe_diff.MoEDiffTransformer(cfg.model)
    moe_diff.save(model, tmp_path / "ckpt")
    for loaded in (moe_diff.load(tmp_path / "ckpt"), moe_diff.open_model(tmp_path / "ckpt").model):
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), model.state_dict().values(),
                                                      strict=True))
    prompt = torch.tensor([list(b"def ")])
    tokens = moe_diff.generate(model, prompt, max_new_tokens=5)
    streamed = torch.stack(list(moe_diff.stream(model, prompt, 5)), 1)
    assert torch.equal(tokens[:, 4:], streamed)
    moe_diff.to_hf_mixtral(model, tmp_path / "hf")
    back = moe_diff.from_hf_mixtral(tmp_path / "hf")
    torch.testing.assert_close(back(prompt).logits, model(prompt).logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(moe_diff.MoeDiffError, match="model.top_k=0"):
        moe_diff.ModelConfig(top_k=0)
    with pytest.raises(moe_diff.CheckpointError):
        moe_diff.open_model(tmp_path / "nothing")
