"""The parallel plan names every parameter and stored buffer of every attention mode exactly once, and nothing
else."""

import fnmatch

import pytest
import torch
from torch import nn

from moe_diff.config import ModelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel import plan
from moe_diff.parallel.apply import check_paths

SHAPES = dict(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, n_experts=4, max_seq_len=16)
MODELS = [ModelConfig(**SHAPES, attention=mode, tie_embeddings=tied, expert_bias_rate=rate)
          for mode in ("standard", "diff", "diff_v2") for tied, rate in ((False, 0.0), (True, 0.01))]


def parameters(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the model's state dict (a checkpoint's), tied ones under both names."""
    with torch.device("meta"):
        return MoEDiffTransformer(cfg).state_dict(keep_vars=True)


@pytest.mark.parametrize("cfg", MODELS, ids=lambda cfg: f"{cfg.attention}-tied{cfg.tie_embeddings}")
def test_every_parameter_has_one_placement_that_fits_its_shape(cfg: ModelConfig) -> None:
    for name, param in parameters(cfg).items():
        placed = plan.placement(name)
        for dim in (placed.ep, placed.tp, placed.vocab):
            assert dim is None or dim < param.dim(), name
        assert placed.ep in (None, 0) and (placed.ep is None) == (param.dim() != 3), name  # experts: [E, ...]


def test_every_entry_of_the_plan_is_some_parameter() -> None:
    names = {name for cfg in MODELS for name in parameters(cfg)}
    assert {pattern for pattern in plan.PLAN if not any(fnmatch.fnmatchcase(n, pattern) for n in names)} == set()


def test_a_parameter_missing_from_the_plan_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new parameter without an entry, or an entry removed, fails here before any job runs."""
    model = MoEDiffTransformer(MODELS[2])
    model.layers[0].attention.temperature = nn.Parameter(torch.ones(1))
    with pytest.raises(plan.UnplannedParameter, match="layers.0.attention.temperature has 0 entries"):
        [plan.placement(name) for name, _ in model.named_parameters()]
    monkeypatch.delitem(plan.PLAN, "layers.*.attention.subln.weight")
    plan.placement.cache_clear()
    try:
        with pytest.raises(plan.UnplannedParameter, match="layers.1.attention.subln.weight"):
            plan.placement("layers.1.attention.subln.weight")
    finally:
        plan.placement.cache_clear()


@pytest.mark.parametrize("cfg", MODELS[::2], ids=lambda cfg: cfg.attention)
def test_every_module_path_of_the_plan_names_a_module(cfg: ModelConfig) -> None:
    """Each style of the fullest layout (ep, tp, cp, vocabulary and sequence split) finds its modules; a path that names
    none is refused before parallelize_module would skip it with a warning."""
    with torch.device("meta"):
        model = MoEDiffTransformer(cfg)
    styles = plan.module_plan(2, 2, 2, True, True)
    assert set(styles) == {"ep", "tp", "cp"}
    for dim_styles in styles.values():
        check_paths(model, dim_styles)
    with pytest.raises(LookupError, match="'layers.*.attention.w_o', which matches no module"):
        check_paths(model, {"layers.*.attention.w_o": styles["tp"]["layers.*.attention.wo"]})
