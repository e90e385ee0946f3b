"""Routing options: capacity with drops, router jitter, aux-loss-free expert bias, and the per-layer counts."""

import copy
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import final_weights, small_config  # tests/ is on the path

from moe_diff.config import ConfigError, ModelConfig
from moe_diff.kernels import moe_experts
from moe_diff.model import MoE, MoEDiffTransformer, Routing, route, within_capacity
from moe_diff.runs import read_metrics
from moe_diff.train import train


def moe_layer(dtype: torch.dtype = torch.float64, **overrides) -> MoE:
    torch.manual_seed(0)
    settings = dict(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=12, n_experts=4, top_k=2)
    layer = MoE(ModelConfig(**settings | overrides)).to(dtype)
    with torch.no_grad():
        for param in layer.parameters():
            param.normal_(0, 0.5)
    return layer


def brute_force_kept(expert_ids: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """First choices of all tokens in order, then second choices: an expert takes assignments while it has room."""
    kept, taken = torch.zeros_like(expert_ids, dtype=torch.bool), [0] * n_experts
    for slot in range(expert_ids.shape[1]):
        for token in range(expert_ids.shape[0]):
            expert = int(expert_ids[token, slot])
            if taken[expert] < capacity:
                kept[token, slot], taken[expert] = True, taken[expert] + 1
    return kept


@pytest.mark.parametrize("capacity", [0, 1, 3, 7])
def test_capacity_keeps_first_choices_first_and_tokens_in_order(capacity: int) -> None:
    ids = torch.stack([torch.randperm(5, generator=torch.Generator().manual_seed(t))[:2] for t in range(13)])
    ids[:6, 0] = 2  # one crowded expert
    assert torch.equal(within_capacity(ids, 5, capacity), brute_force_kept(ids, 5, capacity))


@pytest.mark.parametrize("capacity_factor", [0.5, 1.0, 1.25])
def test_dropped_assignments_contribute_nothing_and_are_counted(capacity_factor: float) -> None:
    layer = moe_layer(capacity_factor=capacity_factor)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    out, routing = layer(x)
    capacity = -(-int(capacity_factor * 18 * 2) // 4)  # ceil(cf * N * K / E)
    kept = brute_force_kept(routing.expert_ids, 4, capacity)
    flat, w = x.reshape(18, 8), layer.experts
    expected = torch.zeros_like(flat)
    for t in range(18):
        chosen = routing.probs[t, routing.expert_ids[t]]
        for s, e in enumerate(routing.expert_ids[t].tolist()):
            if kept[t, s]:
                h = F.silu(w.w1[e] @ flat[t]) * (w.w3[e] @ flat[t])
                expected[t] += chosen[s] / chosen.sum() * (w.w2[e] @ h)
    torch.testing.assert_close(out.reshape(18, 8), expected, rtol=0, atol=1e-12)
    assert int(routing.dropped) == int((~kept).sum()) and routing.counts.max() <= capacity
    assert torch.equal(routing.counts, torch.bincount(routing.expert_ids[kept], minlength=4))


def every_assignment(layer: MoE, x: torch.Tensor) -> tuple[torch.Tensor, Routing]:
    """The MoE layer with every chosen assignment computed, a dropped one at weight 0, token by token."""
    flat, w = x.reshape(-1, x.shape[-1]), layer.experts
    routing = route(layer.gate(flat), layer.top_k, None, layer.capacity_factor)
    rows = [sum(routing.weights[t, s] * (w.w2[e] @ (F.silu(w.w1[e] @ flat[t]) * (w.w3[e] @ flat[t])))
                for s, e in enumerate(routing.expert_ids[t].tolist())) for t in range(len(flat))]
    return torch.stack(rows).view_as(x), routing


@pytest.mark.parametrize("backend", ["reference", "grouped_mm", "auto"])
@pytest.mark.parametrize("capacity_factor", [0.5, 1.0])
def test_a_model_with_drops_equals_every_assignment_computed_at_weight_zero(backend: str,
                                                                           capacity_factor: float) -> None:
    """Outputs, losses, every parameter's gradient and the routing counts, against the brute force."""
    torch.manual_seed(0)
    model = MoEDiffTransformer(ModelConfig(vocab_size=32, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=24,
                                           n_experts=4, top_k=2, capacity_factor=capacity_factor,
                                           moe_backend=backend))
    brute_force = copy.deepcopy(model)
    for block in brute_force.layers:
        block.moe.forward = partial(every_assignment, block.moe)
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    outputs = []
    for m in (model, brute_force):
        out = m(tokens)
        (out.logits.square().mean() + out.aux_loss).backward()
        outputs.append((out, [p.grad for p in m.parameters()]))
    (out, grads), (expected, expected_grads) = outputs
    assert sum(int(r.dropped) for r in out.routings) > 0
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, expected.aux_loss)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    for routing, reference in zip(out.routings, expected.routings, strict=True):
        assert torch.equal(routing.counts, reference.counts) and int(routing.dropped) == int(reference.dropped)


@pytest.mark.parametrize("backend", ["reference", "auto", "grouped_mm"])
def test_the_experts_compute_only_the_assignments_that_fit(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rows each expert's SwiGLU runs over (grouped_mm: the rows inside its groups, for each of its three GEMMs)
    add up to the kept assignments, not to all N*K; auto at 16 tokens without autograd groups them on the host."""
    rows: list[int] = []
    if backend == "grouped_mm":
        grouped_mm = moe_experts.grouped_mm
        monkeypatch.setattr(moe_experts, "grouped_mm",
                            lambda a, b, offs: rows.append(int(offs[-1])) or grouped_mm(a, b, offs=offs))
    else:
        silu = F.silu
        monkeypatch.setattr(F, "silu", lambda h: rows.append(len(h)) or silu(h))
    layer = moe_layer(torch.float32, capacity_factor=0.5, dim=16, ffn_dim=16, moe_backend=backend)
    with torch.no_grad():
        _, routing = layer(torch.randn(2, 8, 16))
    kept = int(routing.counts.sum())
    assert 0 < kept <= 16  # half the room: at most half the 32 assignments fit
    if backend == "grouped_mm":
        assert rows == [kept] * 3
    else:
        assert sum(rows) == kept


def test_a_roomy_capacity_equals_dropless() -> None:
    x = torch.randn(1, 10, 8, dtype=torch.float64)
    out, routing = moe_layer(capacity_factor=4.0)(x)
    dropless, reference = moe_layer()(x)
    torch.testing.assert_close(out, dropless, rtol=0, atol=0)
    assert int(routing.dropped) == 0 and torch.equal(routing.counts, reference.counts)


def test_jitter_perturbs_the_router_input_only_while_training() -> None:
    x = torch.randn(1, 64, 8, dtype=torch.float64)
    plain, jittered = moe_layer(), moe_layer(router_jitter=0.5)
    jittered.eval()
    assert torch.equal(jittered(x)[0], plain(x)[0])
    jittered.train()
    torch.manual_seed(1)
    logits = jittered(x)[1].logits
    assert not torch.allclose(logits, plain(x)[1].logits)


def test_expert_bias_selects_but_does_not_weigh() -> None:
    logits = torch.randn(6, 4, dtype=torch.float64)
    bias = torch.tensor([0.0, 0.0, 0.0, 10.0], dtype=torch.float64)
    routing = route(logits, 2, bias)
    assert bool((routing.expert_ids == 3).any(-1).all())  # everybody picks the favoured expert
    probs = logits.softmax(-1)
    chosen = probs.gather(-1, routing.expert_ids)
    torch.testing.assert_close(routing.weights, chosen / chosen.sum(-1, keepdim=True))


def test_expert_bias_moves_against_the_load() -> None:
    model = MoEDiffTransformer(ModelConfig(vocab_size=16, dim=8, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=8,
                                           n_experts=4, expert_bias_rate=0.1))
    model.update_expert_biases(torch.tensor([[5, 1, 1, 1], [2, 2, 2, 2]]))
    torch.testing.assert_close(model.layers[0].moe.expert_bias, torch.tensor([-0.1, 0.1, 0.1, 0.1]))
    assert torch.equal(model.layers[1].moe.expert_bias, torch.zeros(4))
    assert "layers.0.moe.expert_bias" in model.state_dict()


def test_expert_bias_update_is_the_same_with_gradient_accumulation(tmp_path: Path) -> None:
    settings = ("model.expert_bias_rate=0.01", "train.max_steps=1", "train.batch_size=8")
    train(small_config(tmp_path / "one", *settings))
    train(small_config(tmp_path / "four", *settings, "train.grad_accum=4"))
    one, four = final_weights(tmp_path / "one"), final_weights(tmp_path / "four")
    for layer in range(2):
        key = f"layers.{layer}.moe.expert_bias"
        assert torch.equal(one[key], four[key]) and one[key].abs().sum() > 0


def test_capacity_training_logs_the_dropped_fraction(tmp_path: Path) -> None:
    train(small_config(tmp_path, "model.capacity_factor=0.5", "train.max_steps=2"))
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "dropped_fraction" in r]
    assert records and all(0.5 <= r["dropped_fraction"] < 1 for r in records)  # half the room: at least half dropped


@pytest.mark.parametrize(("field", "value", "needle"), [
    ("capacity_factor", 0, "model.capacity_factor=0"),
    ("router_jitter", 1.0, "model.router_jitter=1.0"),
    ("expert_bias_rate", -1.0, "model.expert_bias_rate=-1.0"),
])
def test_bad_routing_options_are_named(field: str, value: float, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        ModelConfig(**{field: value})


def test_logged_routing_statistics_are_those_of_the_chosen_experts(tmp_path: Path, monkeypatch) -> None:
    """With a selection bias and a capacity, the experts routing chose are not the router logits' top-k: the
    logged shares are each step's computed assignments (Routing.counts), over their sum."""
    counts: list[torch.Tensor] = []
    forward = MoE.forward

    def recording(self: MoE, x: torch.Tensor):
        out, routing = forward(self, x)
        if self.training:
            counts.append(routing.counts.clone())
        return out, routing

    monkeypatch.setattr(MoE, "forward", recording)
    train(small_config(tmp_path, "model.expert_bias_rate=1.0", "model.capacity_factor=1.0", "train.max_steps=3",
                       "train.eval_every=0"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    per_step = torch.stack(counts).view(3, 2, -1).double()  # [steps, layers, E]
    for record, step_counts in zip(records, per_step, strict=True):
        expected = step_counts / step_counts.sum(-1, keepdim=True)
        torch.testing.assert_close(torch.tensor(record["expert_share"], dtype=torch.float64), expected)
        assert record["dead_experts"] == (step_counts == 0).sum(-1).tolist()
        assert record["load_imbalance"] == pytest.approx((step_counts.max(-1).values / step_counts.mean(-1)).tolist())
    assert any(record["dropped_fraction"] > 0 for record in records)


def test_the_summary_counts_what_routing_kept() -> None:
    from moe_diff.routing.summary import layer_summary

    logits = torch.randn(12, 4, dtype=torch.float64)
    routing = route(logits, 2, torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64), capacity_factor=1.0)
    assert int(routing.dropped) > 0  # every token chose expert 0, which has room for 6 of 12
    summary = layer_summary([routing])
    counts = routing.counts.double()
    assert summary["expert_share"][0] == pytest.approx((counts / counts.sum()).tolist())
    assert summary["dead_experts"] == [int((counts == 0).sum())]
    probs = logits.softmax(-1)
    entropy = -(probs * probs.log()).sum(-1).mean() / torch.log(torch.tensor(4.0, dtype=torch.float64))
    assert summary["router_entropy"] == [pytest.approx(entropy.item())]


def test_dropless_counts_include_a_chosen_expert_whose_probability_underflows() -> None:
    """Without a capacity every chosen assignment is computed, even one of weight 0 (its probability underflowed)."""
    routing = route(torch.tensor([[100.0, -20.0, -30.0, -40.0]]), 2)
    assert routing.weights[0, 1] == 0
    assert torch.equal(routing.counts, torch.bincount(routing.expert_ids.flatten(), minlength=4))
    assert int(routing.counts.sum()) == 2 and int(routing.dropped) == 0
