"""AdamW with weight-decay groups, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from moe_diff.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """Decay matrices and embeddings; not norms or lambda vectors (anything 1-D). Fused kernels, which take
    parameters split over a mesh (DTensors) and whole ones in separate groups."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if (p.dim() >= 2) == decay and isinstance(p, DTensor) == split],
               "weight_decay": cfg.weight_decay if decay else 0.0}
              for decay in (True, False) for split in (False, True)]
    groups = [group for group in groups if group["params"]]
    return torch.optim.AdamW(groups, lr=learning_rate(0, cfg), betas=(cfg.beta1, cfg.beta2), fused=True)


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Rate for optimizer step `step` (0-based): linear warmup, then cosine from lr down to min_lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
