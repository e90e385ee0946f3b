"""Parameter counts, forward FLOPs, KV-cache size and attention's widths and memory of a configuration; shapes
are read off the model built on the meta device, so no memory is spent on them."""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from moe_diff.config import ModelConfig
from moe_diff.model import MoEDiffTransformer


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # used by one token: top_k of the n_experts experts in each layer
    embedding: int  # token embedding plus an untied output head
    experts_total: int
    experts_active: int
    attention_per_layer: int


@dataclass(frozen=True)
class FlopCounts:
    """Forward FLOPs per token (a multiply-add counts 2), averaged over a sequence."""

    matmul: int  # projections, router, the chosen experts and the output head
    attention: float  # q.k scores and probability-weighted values over the keys each query sees
    mean_keys: float  # keys a query attends to, averaged over the positions of the sequence

    @property
    def total(self) -> float:
        return self.matmul + self.attention


@functools.lru_cache(maxsize=32)
def _parameter_shapes(values: tuple) -> dict[str, torch.Size]:
    with torch.device("meta"):  # shapes only: no memory, whatever the size
        model = MoEDiffTransformer(ModelConfig(*values))
    return {name: param.shape for name, param in model.named_parameters()}  # a tied head counts once


def parameter_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Every parameter's shape, read off the model itself (built on the meta device, with the reference backends,
    which need nothing installed and leave the shapes as they are)."""
    return _parameter_shapes(dataclasses.astuple(dataclasses.replace(cfg, attn_backend="reference",
                                                                     moe_backend="reference")))


def _numel(shapes: dict[str, torch.Size], keep: Callable[[str, torch.Size], bool]) -> int:
    return sum(math.prod(shape) for name, shape in shapes.items() if keep(name, shape))


def attention_params(cfg: ModelConfig) -> int:
    """One layer's attention parameters: projections plus each mode's lambda and norm weights."""
    return _numel(parameter_shapes(cfg), lambda name, _: name.startswith("layers.0.attention."))


def param_counts(cfg: ModelConfig) -> ParamCounts:
    shapes = parameter_shapes(cfg)
    experts_total = _numel(shapes, lambda name, _: ".experts." in name)
    experts_active = experts_total * cfg.top_k // cfg.n_experts
    embedding = _numel(shapes, lambda name, _: name in ("tok_embeddings.weight", "output.weight"))
    total = _numel(shapes, lambda name, _: True)
    return ParamCounts(total, total - experts_total + experts_active, embedding, experts_total, experts_active,
                       attention_params(cfg))


def causal_pairs(n_positions: int, window: int | None) -> int:
    """(query, key) pairs causal attention scores among the first `n_positions` positions: the sum over them of
    the keys position i sees, min(i + 1, window)."""
    if window is None or n_positions <= window:
        return n_positions * (n_positions + 1) // 2
    return window * (window + 1) // 2 + (n_positions - window) * window


def mean_keys_per_query(seq_len: int, window: int | None) -> float:
    """Average over positions i < seq_len of the keys i sees: min(i + 1, window)."""
    return causal_pairs(seq_len, window) / seq_len


def attention_flops_per_key(cfg: ModelConfig) -> int:
    """FLOPs one token spends per attended key in one layer.

    standard: n_heads heads of q.k (2d) and p.v (2d). diff: n_heads/2 heads, each two q.k maps
    (2 x 2d) and two maps applied to 2d-wide values (2 x 4d). diff_v2: 2*n_heads query heads.
    """
    d = cfg.resolved_head_dim
    per_query_head = {"standard": 4 * d, "diff": 6 * d, "diff_v2": 8 * d}[cfg.attention]
    return per_query_head * cfg.n_heads


def flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopCounts:
    shapes = parameter_shapes(cfg)
    # a token multiplies by every matrix of a layer but the experts it was not routed to (the lambda vectors and
    # norm weights are not matrices), and by the output head
    layer_matrices = _numel(shapes, lambda name, shape: name.startswith("layers.0.") and len(shape) == 2)
    experts = cfg.top_k * _numel(shapes, lambda name, _: name.startswith("layers.0.moe.experts.")) // cfg.n_experts
    matmul = 2 * (cfg.n_layers * (layer_matrices + experts) + cfg.vocab_size * cfg.dim)
    keys = mean_keys_per_query(seq_len, cfg.sliding_window)
    return FlopCounts(matmul, cfg.n_layers * attention_flops_per_key(cfg) * keys, keys)


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_element: int) -> int:
    """Keys and values cached per token over all layers; the same in all three modes.

    standard and diff_v2 cache n_kv_heads keys and values of width d; diff caches n_kv_heads/2
    groups of (k1, k2) of width d and one 2d-wide value: the same number of elements.
    """
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.resolved_head_dim * bytes_per_element


def kv_cache_bytes_per_sequence(cfg: ModelConfig, seq_len: int, bytes_per_element: int) -> int:
    """A sequence's cache: a sliding window keeps only the last `sliding_window` positions."""
    cached = seq_len if cfg.sliding_window is None else min(seq_len, cfg.sliding_window)
    return cached * kv_cache_bytes_per_token(cfg, bytes_per_element)


@dataclass(frozen=True)
class AttentionWidths:
    """Per-position widths of one layer's attention tensors on one of `tp` tensor-parallel ranks."""

    query: int  # all query maps' elements
    key_value: int  # keys and values together: what a rank receives per position it does not hold
    map_outputs: int  # every softmax map's output: the diff modes' two per head before they are combined
    maps: int  # softmax rows per query position (each keeps a float32 log-sum-exp for the backward)


def attention_widths(cfg: ModelConfig, tp: int = 1) -> AttentionWidths:
    """Read off the projections: wq's rows are the queries, wk's and wv's the keys and values, wo's columns the
    combined output (diff keeps each map's output apart, twice as wide; diff_v2's 2H query heads' likewise)."""
    shapes = parameter_shapes(cfg)
    width = {name: shapes[f"layers.0.attention.{name}.weight"] for name in ("wq", "wk", "wv", "wo")}
    query = width["wq"][0] // tp
    outputs = width["wo"][1] // tp * (1 if cfg.attention == "standard" else 2)
    return AttentionWidths(query, (width["wk"][0] + width["wv"][0]) // tp, outputs, query // cfg.resolved_head_dim)


def fused_attention_bytes(queries: int, keys: int, widths: AttentionWidths, bytes_per_element: int) -> int:
    """What a fused attention kernel (Triton, flash-attn, CUDA SDPA) keeps for its backward in one layer, for
    `queries` positions attending to `keys`: the queries, the keys and values, each map's output, and a float32
    log-sum-exp per softmax row. (Triton's diff kernel keeps the second map's output in float32: a little more.)"""
    elements = queries * (widths.query + widths.map_outputs) + keys * widths.key_value
    return elements * bytes_per_element + queries * widths.maps * 4
