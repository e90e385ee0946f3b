"""Differentiable collectives that more than one kind of parallelism sends its activations through."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol


def exchange(rows: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """all_to_all_single of rows [sum(send), ...] into [sum(recv), ...], differentiable (the backward sends the
    gradients back the way the rows came): the experts' tokens (expert_parallel) and the keys a rank's queries may
    see (context_parallel)."""
    return funcol.wait_tensor(funcol.all_to_all_single_autograd(rows, recv, send, group))
