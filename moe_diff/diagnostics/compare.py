"""How routing changed between two models on the same tokens, including experts that swapped labels."""

from __future__ import annotations

from typing import Any

import torch

from moe_diff.routing.trace import RoutingTrace, TraceError


def max_weight_matching(weights: torch.Tensor) -> list[int]:
    """The permutation p maximising sum_i weights[i, p[i]] for a square matrix (Hungarian method)."""
    cost = (weights.max() - weights).double().tolist()
    n = len(cost)
    u, v = [0.0] * (n + 1), [0.0] * (n + 1)
    match, way = [0] * (n + 1), [0] * (n + 1)  # match[j]: row assigned to column j (1-based; 0 = none)
    for row in range(1, n + 1):
        match[0], column = row, 0
        best, used = [float("inf")] * (n + 1), [False] * (n + 1)
        while match[column]:
            used[column] = True
            i, delta, next_column = match[column], float("inf"), 0
            for j in range(1, n + 1):
                if not used[j]:
                    reduced = cost[i - 1][j - 1] - u[i] - v[j]
                    if reduced < best[j]:
                        best[j], way[j] = reduced, column
                    if best[j] < delta:
                        delta, next_column = best[j], j
            for j in range(n + 1):
                if used[j]:
                    u[match[j]] += delta
                    v[j] -= delta
                else:
                    best[j] -= delta
            column = next_column
        while column:
            previous = way[column]
            match[column] = match[previous]
            column = previous
    permutation = [0] * n
    for j in range(1, n + 1):
        permutation[match[j] - 1] = j - 1
    return permutation


def compare_traces(a: RoutingTrace, b: RoutingTrace) -> dict[str, Any]:
    """Per layer: tokens whose first choice / chosen set changed, Jaccard overlap of the chosen sets, each
    expert's load change, and the best one-to-one matching of a's experts to b's."""
    if not torch.equal(a.token_ids, b.token_ids) or a.expert_ids.shape != b.expert_ids.shape:
        raise TraceError("the two traces do not cover the same tokens with the same layers and top-k")
    n, n_experts = a.n_tokens, a.n_experts
    layers = []
    for layer in range(a.n_layers):
        ea, eb = a.expert_ids[layer], b.expert_ids[layer]
        set_a = torch.zeros(n, n_experts, dtype=torch.bool).scatter_(1, ea, True)
        set_b = torch.zeros(n, n_experts, dtype=torch.bool).scatter_(1, eb, True)
        jaccard = (set_a & set_b).sum(1).double() / (set_a | set_b).sum(1).double()
        joint = torch.zeros(n_experts, n_experts, dtype=torch.float64)
        joint.index_put_((ea[:, 0], eb[:, 0]), torch.ones(n, dtype=torch.float64), accumulate=True)
        matching = max_weight_matching(joint)
        load_a = torch.bincount(ea.flatten(), minlength=n_experts).double() / ea.numel()
        load_b = torch.bincount(eb.flatten(), minlength=n_experts).double() / eb.numel()
        relabelled = torch.tensor(matching)[ea]  # a's choices in b's labels
        layers.append({
            "top1_changed": (ea[:, 0] != eb[:, 0]).double().mean().item(),
            "topk_set_changed": (set_a != set_b).any(1).double().mean().item(),
            "jaccard": jaccard.mean().item(),
            "load_change": (load_b - load_a).tolist(),
            "matching": matching,
            "top1_changed_after_matching": (relabelled[:, 0] != eb[:, 0]).double().mean().item(),
            "topk_set_changed_after_matching": (
                torch.zeros(n, n_experts, dtype=torch.bool).scatter_(1, relabelled, True) != set_b
            ).any(1).double().mean().item(),
        })
    return {"n_tokens": n, "layers": layers}
