"""Per-layer routing statistics from what routing chose: the assignment counts that `Routing` derives from its expert
ids and weights (an assignment dropped for capacity has weight 0; a routing trace holds the same tensors), and the
router probabilities.

Legend: N tokens, K experts per token, E experts, L layers.
"""

from __future__ import annotations

import math

import torch

from moe_diff.model import Routing


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
    """load_summary and each layer's router entropy, from the routings of one forward pass (or of a trace)."""
    counts = torch.stack([routing.counts for routing in routings])
    return load_summary(counts) | {"router_entropy": [router_entropy(r.probs).item() for r in routings]}
