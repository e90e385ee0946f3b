"""Routing statistics of a trace, per layer and overall, as plain JSON-ready numbers.

Legend: N tokens, L layers, E experts, K experts per token.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from moe_diff.model import assignment_counts
from moe_diff.routing.summary import load_summary, router_entropy, token_entropy
from moe_diff.routing.trace import RoutingTrace

NEAR_DEAD_UTILISATION = 0.1  # an expert with under a tenth of its ideal load is near-dead
IMBALANCE_FLAG = 2.0  # max/mean load above this flags a layer
COLLAPSED_ENTROPY = 0.1  # mean router entropy / ln E below this flags a layer
POSITION_BUCKETS = (0, 16, 64, 256, 1024)
BYTE_CLASSES = ("letter", "digit", "space", "symbol", "non-ascii", "end-of-text")


def summary(values: torch.Tensor) -> dict[str, float]:
    """min, max, coefficient of variation and percentiles of a 1-D tensor."""
    values = values.double()
    quantiles = torch.quantile(values, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    mean = values.mean().item()
    return {"min": values.min().item(), "max": values.max().item(), "mean": mean,
            "cv": values.std(unbiased=False).item() / mean if mean else 0.0,
            "p10": quantiles[0], "p50": quantiles[1], "p90": quantiles[2]}


def byte_classes(token_ids: torch.Tensor) -> torch.Tensor:
    """Class index into BYTE_CLASSES for byte-level token ids."""
    ids = token_ids.long()
    classes = torch.full_like(ids, 3)  # symbol
    letter = ((ids >= 65) & (ids <= 90)) | ((ids >= 97) & (ids <= 122))
    classes[letter] = 0
    classes[(ids >= 48) & (ids <= 57)] = 1
    classes[(ids == 32) | (ids == 9) | (ids == 10) | (ids == 13)] = 2
    classes[(ids >= 128) & (ids < 256)] = 4
    classes[ids >= 256] = 5
    return classes


def frequency_classes(token_ids: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Tokens grouped by how common their id is in the trace: the ids making up the first half of
    the tokens, the next 40%, and the rarest 10%."""
    ids, counts = torch.unique(token_ids, return_counts=True)
    order = counts.argsort(descending=True)
    cumulative = counts[order].cumsum(0).double() / token_ids.numel()
    rank_class = torch.bucketize(cumulative, torch.tensor([0.5, 0.9], dtype=torch.float64), right=False)
    lookup = dict(zip(ids[order].tolist(), rank_class.tolist(), strict=True))
    return torch.tensor([lookup[i] for i in token_ids.tolist()]), ["frequent", "common", "rare"]


def domains(trace: RoutingTrace) -> tuple[torch.Tensor, list[str]]:
    """Each token's domain: the first component of its document's name (a package, a directory)."""
    def domain(name: str) -> str:
        first = name.split(":")[0].replace("\\", "/").split("/")
        return first[0] if len(first) > 1 else "(top level)"

    names = sorted({domain(n) for n in trace.document_names}) or ["(none)"]
    index = {name: i for i, name in enumerate(names)}
    per_document = torch.tensor([index[domain(n)] for n in trace.document_names] or [0])
    return per_document[trace.document_ids], names


def expert_share_by_group(groups: torch.Tensor, top1: torch.Tensor, n_groups: int, n_experts: int) -> torch.Tensor:
    """[groups, E]: for each group of tokens, the share of its tokens whose first choice is each expert."""
    counts = torch.zeros(n_groups, n_experts, dtype=torch.float64)
    counts.index_put_((groups, top1), torch.ones_like(top1, dtype=torch.float64), accumulate=True)
    return counts / counts.sum(1, keepdim=True).clamp_min(1)


def normalised_mutual_information(groups: torch.Tensor, top1: torch.Tensor, n_groups: int, n_experts: int) -> float:
    """I(group; first-choice expert) / H(first-choice expert): 0 when routing ignores the group, 1 when the
    group decides it."""
    joint = torch.zeros(n_groups, n_experts, dtype=torch.float64)
    joint.index_put_((groups, top1), torch.ones_like(top1, dtype=torch.float64), accumulate=True)
    joint /= joint.sum()
    p_group, p_expert = joint.sum(1, keepdim=True), joint.sum(0, keepdim=True)
    nonzero = joint > 0
    mutual = (joint[nonzero] * (joint[nonzero] / (p_group @ p_expert)[nonzero]).log()).sum().item()
    entropy = -(p_expert[p_expert > 0] * p_expert[p_expert > 0].log()).sum().item()
    return mutual / entropy if entropy > 0 else 0.0


def consecutive_rates(trace: RoutingTrace, layer: int, seed: int = 0) -> dict[str, float]:
    """How often consecutive tokens of a sequence share their first choice / any chosen expert, and the
    same rates for random routing with the same loads (first choice: sum of squared shares; any
    expert: the rate after shuffling which token got which choices)."""
    experts = trace.expert_ids[layer]
    same_sequence = trace.sequence_ids[1:] == trace.sequence_ids[:-1]
    if not same_sequence.any():
        return {"top1_same": math.nan, "top1_random": math.nan, "topk_overlap": math.nan, "topk_random": math.nan}

    def overlap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a[:, :, None] == b[:, None, :]).any(-1).any(-1)

    top1_same = (experts[1:, 0] == experts[:-1, 0])[same_sequence].double().mean().item()
    top1_share = torch.bincount(experts[:, 0], minlength=trace.n_experts).double() / trace.n_tokens
    shuffled = experts[torch.randperm(trace.n_tokens, generator=torch.Generator().manual_seed(seed))]
    return {"top1_same": top1_same, "top1_random": top1_share.square().sum().item(),
            "topk_overlap": overlap(experts[1:], experts[:-1])[same_sequence].double().mean().item(),
            "topk_random": overlap(shuffled[1:], shuffled[:-1]).double().mean().item()}


def layer_stats(trace: RoutingTrace, layer: int, classes: tuple[torch.Tensor, list[str]],
                domain_groups: tuple[torch.Tensor, list[str]]) -> dict[str, Any]:
    n, n_experts, k = trace.n_tokens, trace.n_experts, trace.top_k
    experts, probs = trace.expert_ids[layer], trace.probs[layer].double()
    counts = assignment_counts(experts, trace.weights[layer] != 0, n_experts)  # a trace marks drops by weight 0
    utilisation = counts.double() / (n * k / n_experts)
    load = load_summary(counts[None])
    entropy = token_entropy(probs)  # [N] nats
    top2 = probs.topk(min(2, n_experts), dim=-1).values
    chosen = torch.zeros(n, n_experts, dtype=torch.float64)
    chosen.scatter_(1, experts, 1.0)
    top1 = experts[:, 0]
    positions = torch.bucketize(trace.positions, torch.tensor(POSITION_BUCKETS[1:]), right=True)
    position_names = [f"{lo}-{hi - 1}" for lo, hi in zip(POSITION_BUCKETS, POSITION_BUCKETS[1:], strict=False)]
    position_names.append(f"{POSITION_BUCKETS[-1]}+")
    groups = {"class": classes, "position": (positions, position_names), "domain": domain_groups}
    return {
        "counts": counts.tolist(),
        "share": load["expert_share"][0],
        "utilisation": utilisation.tolist(),
        "utilisation_summary": summary(utilisation),
        "max_over_mean": load["load_imbalance"][0],
        "dead_experts": torch.nonzero(counts == 0).flatten().tolist(),
        "near_dead_experts": torch.nonzero((counts > 0) & (utilisation < NEAR_DEAD_UTILISATION)).flatten().tolist(),
        "router_entropy": router_entropy(probs).item(),
        "router_diversity": (entropy.exp().mean() / n_experts).item(),
        "top1_top2_margin": (top2[:, 0] - top2[:, -1]).mean().item(),
        "coactivation": (chosen.T @ chosen / n).tolist(),
        "consecutive": consecutive_rates(trace, layer),
        "specialisation": {
            name: {"groups": labels,
                   "tokens": torch.bincount(g, minlength=len(labels)).tolist(),
                   "first_choice_share": expert_share_by_group(g, top1, len(labels), n_experts).tolist(),
                   "normalised_mutual_information": normalised_mutual_information(g, top1, len(labels), n_experts)}
            for name, (g, labels) in groups.items()},
    }


def flags(layers: list[dict[str, Any]]) -> list[str]:
    """One sentence per problem a user should look at."""
    found = []
    for i, stats in enumerate(layers):
        if stats["dead_experts"]:
            found.append(f"layer {i}: dead experts {stats['dead_experts']} (no tokens)")
        if stats["max_over_mean"] > IMBALANCE_FLAG:
            found.append(f"layer {i}: max/mean load {stats['max_over_mean']:.2f} exceeds {IMBALANCE_FLAG}")
        if stats["router_entropy"] < COLLAPSED_ENTROPY:
            found.append(f"layer {i}: router entropy collapsed ({stats['router_entropy']:.3f} of ln E)")
    return found


def capacity(trace: RoutingTrace) -> dict[str, Any]:
    """The capacity mode of the traced model and its dropped (token, slot) assignments (their weight is 0)."""
    factor = trace.header.get("model", {}).get("capacity_factor")
    mode = "dropless" if factor is None else f"capacity factor {factor}"
    return {"mode": mode, "dropped_assignments": int((trace.weights == 0).sum())}


def routing_stats(trace: RoutingTrace) -> dict[str, Any]:
    """Every statistic of the trace: per layer, across all layers, and the problems found."""
    if trace.header.get("tokenizer") == "byte":
        classes = (byte_classes(trace.token_ids), list(BYTE_CLASSES))
    else:
        classes = frequency_classes(trace.token_ids)
    domain_groups = domains(trace)
    layers = [layer_stats(trace, layer, classes, domain_groups) for layer in range(trace.n_layers)]
    all_utilisation = torch.tensor([u for stats in layers for u in stats["utilisation"]])
    return {
        "n_tokens": trace.n_tokens, "n_layers": trace.n_layers, "n_experts": trace.n_experts, "top_k": trace.top_k,
        "capacity": capacity(trace),
        "utilisation_across_layers": summary(all_utilisation),
        "layers": layers,
        "flags": flags(layers),
    }
