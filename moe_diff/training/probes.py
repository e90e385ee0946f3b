"""Forward hooks that read differential attention's lambda during a pass, from outside the model."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from moe_diff.model import DiffAttention, DiffV2Attention

SPREAD_QUANTILES = torch.tensor([0.1, 0.9])
SPREAD_SAMPLE = 1 << 24  # torch.quantile takes at most this many values


class LambdaProbe:
    """Records each diff layer's lambda: V1 its scalar, V2 the mean of sigmoid(lambda) over tokens and heads, and
    its 10th and 90th percentiles.

    Use as a context manager around one forward pass; `values` lists one float per layer and `spreads` V2's
    [p10, p90] per layer (the first call of each layer counts, so activation-checkpoint recomputation is ignored).
    Compiled blocks run eagerly inside (a compiled block does not call hooks added after it was traced).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._by_layer: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._eager: contextlib.AbstractContextManager = contextlib.nullcontext()

    @property
    def values(self) -> list[float]:
        return [self._by_layer[i][0].item() for i in sorted(self._by_layer)]

    @property
    def spreads(self) -> list[list[float]]:
        return [self._by_layer[i][1:].tolist() for i in sorted(self._by_layer) if len(self._by_layer[i]) > 1]

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple) -> None:
            if index in self._by_layer:
                return
            with torch.no_grad():
                if isinstance(module, DiffV2Attention):
                    value = module.lambda_value(args[0]).float()
                    spread = torch.quantile(value.flatten()[:SPREAD_SAMPLE], SPREAD_QUANTILES.to(value.device))
                    found = torch.cat([value.mean()[None], spread])
                else:
                    found = module.lambda_value().float().mean()[None]
            self._by_layer[index] = found  # no .item() here: it would break a compiled graph
        return record

    def __enter__(self) -> LambdaProbe:
        attention = [m for m in self.model.modules() if isinstance(m, (DiffAttention, DiffV2Attention))]
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(attention)]
        self._eager = torch.compiler.set_stance("force_eager")  # made here, not before: making one sets the stance
        self._eager.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._eager.__exit__(*exc)
        for handle in self._handles:
            handle.remove()
