"""What a study measures on each final model, on the same held-out tokens for every run: validation loss, the
needle probe at several context lengths (within and beyond the window), activation outliers, attention noise
mass and entropy, lambda, routing balance and specialisation, parameters and FLOPs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moe_diff import costs
from moe_diff.config import Config, ModelConfig
from moe_diff.data import Corpus, Tokenizer, validation_batches
from moe_diff.diagnostics.attention import attention_stats
from moe_diff.diagnostics.needle import needle_probes, shortest_context
from moe_diff.diagnostics.routing import routing_stats
from moe_diff.model import MoEDiffTransformer
from moe_diff.routing.collect import collect_trace
from moe_diff.training.trainer import evaluate


@dataclass(frozen=True)
class Measures:
    """How much of each measurement (stored with every run's results: a run measured otherwise is measured
    again, without training again)."""

    tokens: int = 16384  # held-out tokens for loss, routing; the first batch of 8 sequences for attention
    needle_trials: int = 4  # haystacks per context length and depth
    needle_lengths: tuple[int, ...] = ()  # context lengths in tokens; () : needle_lengths(cfg, tokenizer)

    def lengths(self, cfg: ModelConfig, tokenizer: Tokenizer) -> list[int]:
        """The needle probe's context lengths for a model of `cfg`: those given, else needle_lengths'."""
        return list(self.needle_lengths) or needle_lengths(cfg, tokenizer)


def needle_lengths(cfg: ModelConfig, tokenizer: Tokenizer) -> list[int]:
    """Half the window, the window, twice it and the longest context (each at most max_seq_len); without a
    window, a quarter, half and all of max_seq_len; those too short for a haystack left out."""
    longest, window, shortest = cfg.max_seq_len, cfg.sliding_window, shortest_context(tokenizer)
    lengths = (window // 2, window, 2 * window, longest) if window else (longest // 4, longest // 2, longest)
    return sorted({capped for length in lengths if (capped := min(length, longest)) >= shortest})


def routing_summary(stats: dict[str, Any]) -> dict[str, Any]:
    """Per layer, from routing_stats: balance (max/mean load, dead experts), router entropy (of ln E) and how
    much the first choice tells about the token's class, position and source file (normalised mutual
    information)."""
    layers = stats["layers"]
    return {
        "max_over_mean": [layer["max_over_mean"] for layer in layers],
        "dead_experts": [len(layer["dead_experts"]) for layer in layers],
        "router_entropy": [layer["router_entropy"] for layer in layers],
        "specialisation": {group: [layer["specialisation"][group]["normalised_mutual_information"]
                                   for layer in layers] for group in layers[0]["specialisation"]},
        "expert_share": [layer["share"] for layer in layers],
    }


@torch.no_grad()
def measure(model: MoEDiffTransformer, cfg: Config, tokenizer: Tokenizer, corpus: Corpus,
            settings: Measures) -> dict[str, Any]:
    """Every measurement of one final model (float32), on the device it is on."""
    device = next(model.parameters()).device
    batches = [(batch.to(device), documents)
               for batch, documents in validation_batches(corpus, cfg.train.seq_len, settings.tokens)]
    loss = evaluate(model, [batch for batch, _ in batches], device, precision="float32")
    model.eval()
    header = {"source": "study", "tokenizer": tokenizer.name, "model": vars(model.cfg)}
    trace = collect_trace(model, batches, corpus.val_names, header)
    attention, _ = attention_stats(model, batches[0][0])
    needle = needle_probes(model, tokenizer, settings.lengths(model.cfg, tokenizer), trials=settings.needle_trials)
    counts = costs.param_counts(model.cfg)
    return {
        "val_loss": loss, "val_perplexity": math.exp(min(loss, 50)),
        "val_tokens": sum(batch.targets.numel() for batch, _ in batches),
        "outlier_tokens": batches[0][0].tokens.numel(),
        "needle": needle, "attention": attention, "routing": routing_summary(routing_stats(trace)),
        "costs": {"params_total": counts.total, "params_active": counts.active,
                  "flops_per_token": costs.flops_per_token(model.cfg, cfg.train.seq_len).total},
    }
