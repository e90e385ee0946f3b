"""Per-layer routing statistics from what routing chose: the expert ids and weights that `Routing` and the routing
trace both hold (an assignment dropped for capacity has weight 0), and the router probabilities.

Legend: N tokens, K experts per token, E experts, L layers.
"""

from __future__ import annotations

import math

import torch

from moe_diff.model import Routing


def expert_counts(expert_ids: torch.Tensor, weights: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Assignments each expert computed: [E] from the chosen ids and weights [N, K], dropped ones (weight 0) left
    out."""
    return torch.bincount(expert_ids[weights != 0], minlength=n_experts)


def token_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Each token's router entropy in nats, [N] in float64, from probs [N, E]."""
    probs = probs.detach().double()
    return -(probs * probs.clamp_min(1e-30).log()).sum(-1)


def router_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the router distribution's entropy over ln E, 0-dim, from probs [N, E]: 1 is uniform
    routing, 0 is every token certain of one expert."""
    n_experts = probs.shape[-1]
    if n_experts == 1:
        return torch.zeros((), dtype=torch.float64, device=probs.device)
    return token_entropy(probs).mean() / math.log(n_experts)


def load_summary(counts: torch.Tensor) -> dict[str, list]:
    """Per layer, from the assignment counts [L, E]: each expert's share of them, max/mean load, dead experts."""
    counts = counts.detach().double().cpu()
    mean = counts.mean(-1)
    return {"expert_share": (counts / counts.sum(-1, keepdim=True)).tolist(),
            "load_imbalance": (counts.max(-1).values / mean.clamp_min(1e-30)).tolist(),
            "dead_experts": (counts == 0).sum(-1).tolist()}


def layer_summary(routings: list[Routing]) -> dict[str, list]:
    """load_summary and each layer's router entropy, from the routings of one forward pass."""
    counts = torch.stack([expert_counts(r.expert_ids, r.weights, r.probs.shape[-1]) for r in routings])
    return load_summary(counts) | {"router_entropy": [router_entropy(r.probs).item() for r in routings]}
