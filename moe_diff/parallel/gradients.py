"""Gradients over the job: synchronised once per optimizer step (after the last micro-batch), partial tensor-parallel
gradients summed, data-parallel ones averaged, and the whole model's gradient norm for clipping."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moe_diff.kernels.precision import compute_dtype
from moe_diff.parallel.dims import average_gradients, local_tensor
from moe_diff.parallel.plan import placement, sharded_over_ep
from moe_diff.parallel.runtime import Runtime


def accumulating(module: nn.Module, job: Runtime, last: bool) -> contextlib.AbstractContextManager:
    """Gradients averaged once per step: DDP's no_sync, or FSDP's gradient sync, off but for the last micro-batch."""
    if job.fsdp:
        module.set_requires_gradient_sync(last)
    return module.no_sync() if job.ddp and not last else contextlib.nullcontext()


def sync_gradients(model: nn.Module, job: Runtime) -> None:
    """Sum the gradients that tensor parallelism left partial over the tp group, then average the expert shards
    that DDP and FSDP leave (Runtime.experts_synced_by_hand) over their replicas."""
    if not job.distributed:
        return
    if job.dims.tp > 1:
        for name, param in model.named_parameters():
            if param.grad is not None and placement(name).partial_over_tp(job.sequence_parallel):
                dist.all_reduce(local_tensor(param.grad), group=job.group("tp"))
    if job.experts_synced_by_hand:
        average_gradients(model, job.group("replica"), job.data_group, only=sharded_over_ep)


def clip_grad_norm(model: nn.Module, job: Runtime, max_norm: float) -> torch.Tensor:
    """Clip to the gradient norm of the whole model (returned): whole gradients count once, split ones are summed
    over their groups (after sync_gradients the ranks of a data-parallel group agree; FSDP's shards are summed over
    its mesh)."""
    grads: dict[tuple, list[torch.Tensor]] = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            groups = tuple(split.group for split in job.splits(name))
            if isinstance(param.grad, DTensor):  # FSDP's shard (HSDP: replicated over dp_replicate)
                names = param.grad.device_mesh.mesh_dim_names
                groups += tuple(job.group(names[dim]) for dim, placement in enumerate(param.grad.placements)
                                if placement.is_shard())
            grads.setdefault(groups, []).append(local_tensor(param.grad))
    total = torch.zeros((), device=next(model.parameters()).device)
    for groups, group_grads in grads.items():
        norms = torch.stack(torch._foreach_norm(group_grads))
        squares = norms.to(compute_dtype(norms.dtype)).square().sum()
        for group in groups:
            dist.all_reduce(squares, group=group)
        total = total + squares
    norm = total.sqrt()
    if math.isfinite(max_norm):
        every = [g for group_grads in grads.values() for g in group_grads]
        torch._foreach_mul_(every, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm
