"""Parameter, FLOP and KV-cache accounting against the built model and a FLOP counter."""

import pytest
import torch
from helpers import sdpa_blocks  # tests/ is on the path
from torch.utils.flop_counter import FlopCounterMode

from moe_diff import costs
from moe_diff.config import ModelConfig, load_config
from moe_diff.kernels import attention_op
from moe_diff.kernels.mask import AttentionMask, attention_mask
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.context_parallel import KeyExchange, SequenceLayout, context_shares

MODES = ["standard", "diff", "diff_v2"]


def config(attention: str, **overrides) -> ModelConfig:
    values = dict(vocab_size=60, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=40, n_experts=4,
                  top_k=2, attention=attention, attn_backend="reference", moe_backend="reference")
    return ModelConfig(**(values | overrides))


def attention_params_from_the_formulas(cfg: ModelConfig) -> int:
    """The README's table: wq (diff_v2: doubled query heads), wk, wv, wo, plus diff's four lambda vectors and 2d-wide
    norm weight, or diff_v2's lambda projection."""
    d, D = cfg.resolved_head_dim, cfg.dim
    query_heads = 2 * cfg.n_heads if cfg.attention == "diff_v2" else cfg.n_heads
    projections = query_heads * d * D + 2 * cfg.n_kv_heads * d * D + D * cfg.n_heads * d
    return projections + {"standard": 0, "diff": 4 * d + 2 * d, "diff_v2": cfg.n_heads * D}[cfg.attention]


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("tie", [False, True])
def test_parameter_counts_match_the_model(attention: str, tie: bool) -> None:
    cfg = config(attention, tie_embeddings=tie)
    model = MoEDiffTransformer(cfg)
    counts = costs.param_counts(cfg)
    assert counts.total == sum(p.numel() for p in model.parameters())
    assert counts.experts_total == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert counts.experts_active == counts.experts_total * cfg.top_k // cfg.n_experts
    assert counts.active == counts.total - counts.experts_total + counts.experts_active
    assert counts.attention_per_layer == sum(p.numel() for p in model.layers[0].attention.parameters())
    assert counts.attention_per_layer == attention_params_from_the_formulas(cfg)
    assert counts.embedding == cfg.vocab_size * cfg.dim * (1 if tie else 2)


def test_mixtral_8x7b_counts() -> None:
    """The published 46.7B total and 12.9B active parameters of Mixtral 8x7B."""
    counts = costs.param_counts(load_config(None, ["model.attention=standard"]).model)
    assert round(counts.total / 1e9, 1) == 46.7 and round(counts.active / 1e9, 1) == 12.9


@pytest.mark.parametrize("attention", MODES)
def test_flops_match_a_flop_counter(attention: str) -> None:
    """The reference computes every (query, key) score, so the counter sees T keys per query."""
    cfg, seq_len = config(attention), 6
    with FlopCounterMode(display=False) as counter:
        MoEDiffTransformer(cfg)(torch.randint(0, 60, (1, seq_len)))
    flops = costs.flops_per_token(cfg, seq_len)
    every_key = cfg.n_layers * costs.attention_flops_per_key(cfg) * seq_len
    assert counter.get_total_flops() == seq_len * (flops.matmul + every_key)


def test_diff_attention_does_one_and_a_half_times_the_score_flops() -> None:
    standard, diff = (costs.attention_flops_per_key(config(m)) for m in ("standard", "diff"))
    assert diff == 1.5 * standard


@pytest.mark.parametrize(("seq_len", "window"), [(1, None), (7, None), (7, 3), (7, 7), (7, 20), (64, 16)])
def test_mean_keys_counts_the_mask(seq_len: int, window: int | None) -> None:
    mask = attention_mask(seq_len, seq_len, window, torch.device("cpu"))
    assert costs.mean_keys_per_query(seq_len, window) == pytest.approx(mask.sum().item() / seq_len)


@pytest.mark.parametrize("attention", MODES)
def test_kv_cache_size_is_what_attention_reads(attention: str) -> None:
    cfg = config(attention, sliding_window=8)
    d = cfg.resolved_head_dim
    # k and v per layer: n_kv_heads * d each (diff: kv groups of 2 x d keys and one 2d value)
    assert costs.kv_cache_bytes_per_token(cfg, 2) == cfg.n_layers * 2 * cfg.n_kv_heads * d * 2
    assert costs.kv_cache_bytes_per_sequence(cfg, 100, 2) == 8 * costs.kv_cache_bytes_per_token(cfg, 2)
    assert costs.kv_cache_bytes_per_sequence(cfg, 5, 2) == 5 * costs.kv_cache_bytes_per_token(cfg, 2)


@pytest.mark.parametrize("n_ranks", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 1, 3, 4, 5, 16])
def test_context_shares_count_what_each_ranks_queries_see(n_ranks: int, window: int | None) -> None:
    """Each rank's keys, received positions and scored pairs, counted off the whole sequence's mask rows of the
    positions it holds; the ranks' work adds up to the whole sequence's."""
    seq_len = 32
    visible = attention_mask(seq_len, seq_len, window, torch.device("cpu"))
    shares = context_shares(n_ranks, seq_len, window)
    for rank, share in enumerate(shares):
        held = torch.zeros(seq_len, dtype=torch.bool)
        spans = SequenceLayout(n_ranks, seq_len, window).spans(rank) if n_ranks > 1 else [(0, seq_len)]
        for start, stop in spans:
            held[start:stop] = True
        seen = visible[held].any(0)
        assert (share.queries, share.keys, share.received, share.pairs) == (
            held.sum(), seen.sum(), (seen & ~held).sum(), visible[held].sum())
        assert share.pairs <= share.blocks <= share.queries * share.keys
    assert sum(share.pairs for share in shares) == costs.causal_pairs(seq_len, window) == visible.sum()


@pytest.mark.parametrize("n_ranks", [1, 2, 4])
@pytest.mark.parametrize("window", [None, 3, 5, 16])
def test_one_ranks_blocks_are_the_pairs_cpu_sdpa_scores(n_ranks: int, window: int | None, monkeypatch) -> None:
    """ContextShare.blocks, which `moe-diff info` turns into score maps and masks, counts the (query, key) elements
    of the calls SDPA makes on a rank's spans (blocks of 4 queries here, where a window is shorter than the keys)."""
    from moe_diff.kernels import mask as rule

    monkeypatch.setattr(rule, "QUERY_BLOCK", 4)
    seq_len = 64
    shares = context_shares(n_ranks, seq_len, window)
    for rank, share in enumerate(shares):
        plan = KeyExchange(SequenceLayout(n_ranks, seq_len, window), rank) if n_ranks > 1 else None
        blocks = plan.query_blocks if plan else [(slice(0, seq_len), slice(0, seq_len))]
        calls = sdpa_blocks(monkeypatch)
        for queries, keys in blocks:
            q, k = torch.randn(1, queries.stop - queries.start, 2, 4), torch.randn(1, keys.stop - keys.start, 2, 4)
            attention_op("sdpa", "standard")(q, k, k, AttentionMask(window, torch.zeros(1, k.shape[1], dtype=int)))
        assert share.blocks == sum(queries * keys for queries, keys in calls)
        if window is None:
            assert len(calls) == len(blocks)
        else:  # a window of 16 leaves some spans whole
            assert len(calls) > len(blocks) if window < 16 else len(calls) >= len(blocks)


@pytest.mark.parametrize("attention", MODES)
def test_attention_widths_are_the_projections(attention: str) -> None:
    """What a rank receives per position is a layer's KV cache per token; tp splits every width."""
    cfg = config(attention)
    d = cfg.resolved_head_dim
    widths = costs.attention_widths(cfg)
    assert widths.key_value * cfg.n_layers == costs.kv_cache_bytes_per_token(cfg, 1)
    assert widths.maps * d == widths.query == (2 if attention == "diff_v2" else 1) * cfg.n_heads * d
    assert widths.map_outputs == (1 if attention == "standard" else 2) * cfg.n_heads * d
    assert costs.attention_widths(cfg, tp=2) == costs.AttentionWidths(widths.query // 2, widths.key_value // 2,
                                                                     widths.map_outputs // 2, widths.maps // 2)
