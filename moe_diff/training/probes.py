"""Forward hooks that read differential attention's lambda during a pass, from outside the model."""

from __future__ import annotations

import torch
from torch import nn

from moe_diff.model import DiffAttention, DiffV2Attention


class LambdaProbe:
    """Records each diff layer's lambda: V1 its scalar, V2 the mean of sigmoid(lambda) over tokens.

    Use as a context manager around one forward pass; `values` lists one float per layer (the
    first call of each layer counts, so activation-checkpoint recomputation is ignored).
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self._by_layer: dict[int, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @property
    def values(self) -> list[float]:
        return [self._by_layer[i].item() for i in sorted(self._by_layer)]

    def _hook(self, index: int):
        def record(module: nn.Module, args: tuple) -> None:
            if index in self._by_layer:
                return
            with torch.no_grad():
                if isinstance(module, DiffV2Attention):
                    value = module.lambda_value(args[0])
                else:
                    value = module.lambda_value()
            self._by_layer[index] = value.float().mean()  # no .item() here: it would break a compiled graph
        return record

    def __enter__(self) -> LambdaProbe:
        attention = [m for m in self.model.modules() if isinstance(m, (DiffAttention, DiffV2Attention))]
        self._handles = [m.register_forward_pre_hook(self._hook(i)) for i, m in enumerate(attention)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
