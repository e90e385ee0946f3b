"""Forced expert choices for benchmarks, so that random or untrained weights do not fake the expert load.

"own" keeps the model's router. "uniform" and "zipf" replace the router's scores by Gumbel-perturbed
log-probabilities, so top-k draws experts without replacement with probability proportional to
1 (uniform) or 1 / (rank + 1)^ZIPF_EXPONENT (skewed). The noise is a hash of the (rounded) router input,
so a model and its transformers twin on the same weights make the same choices, as does a compiled step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from moe_diff.errors import UsageError

ROUTING_MODES = ("own", "uniform", "zipf")
ZIPF_EXPONENT = 1.2  # expert e gets weight 1 / (e + 1)^1.2: with 8 experts the busiest sees ~5x the quietest


def expert_log_probs(mode: str, n_experts: int) -> torch.Tensor:
    """Log-probabilities [E] of the forced draw."""
    if mode not in ROUTING_MODES[1:]:
        raise UsageError(f"routing must be one of {', '.join(ROUTING_MODES)}, got {mode!r}")
    exponent = ZIPF_EXPONENT if mode == "zipf" else 0.0
    weights = torch.arange(1, n_experts + 1, dtype=torch.float64) ** -exponent
    return (weights / weights.sum()).log()


class ForcedScores(nn.Module):
    """Router scores [N, E] = log p + Gumbel noise hashed from the router input [N, D]."""

    def __init__(self, mode: str, dim: int, n_experts: int, seed: int):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("log_probs", expert_log_probs(mode, n_experts).float())
        self.register_buffer("projection", torch.randn(dim, n_experts, generator=generator))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # rounded first, so the last-bit differences between two implementations of the model do not matter
        code = torch.round(x.float() @ self.projection.to(x.device) * 16)
        hashed = torch.sin(code) * 43758.5453
        uniform = torch.frac(hashed).abs().clamp(1e-6, 1 - 1e-6)
        return self.log_probs.to(x.device) - torch.log(-torch.log(uniform))


def force_routing(routers: list[nn.Module], mode: str, dim: int, n_experts: int,
                  rewrite: Callable[[torch.Tensor, object], object]) -> list[torch.utils.hooks.RemovableHandle]:
    """Hook each layer's router so its output is `rewrite(forced scores, original output)`; "own" hooks nothing."""
    if mode == "own":
        return []
    handles = []
    for layer, router in enumerate(routers):
        scores = ForcedScores(mode, dim, n_experts, seed=layer)

        def hook(module: nn.Module, args: tuple, output: object, scores: ForcedScores = scores) -> object:
            return rewrite(scores(args[0].reshape(-1, args[0].shape[-1])), output)

        handles.append(router.register_forward_hook(hook))
    return handles
