"""Gradients over the job: synchronised once per optimizer step (after the last micro-batch), gradients that
DTensor left partial summed, those DDP and FSDP leave averaged here, and the whole model's gradient norm for
clipping."""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from moe_diff.kernels.precision import compute_dtype
from moe_diff.parallel.dims import DATA
from moe_diff.parallel.pieces import local_tensor
from moe_diff.parallel.runtime import Runtime

BUCKET_BYTES = 1 << 27  # the most gradient bytes sync_gradients flattens into one all-reduce
SHARDED = (Shard, _StridedShard)  # FSDP's split of a piece that another placement splits is no Shard


def accumulating(module: nn.Module, job: Runtime, last: bool) -> contextlib.AbstractContextManager:
    """Gradients averaged once per step: DDP's no_sync, or FSDP's gradient sync, off but for the last micro-batch."""
    if job.fsdp:
        module.set_requires_gradient_sync(last)
    return module.no_sync() if job.ddp and not last else contextlib.nullcontext()


def sync_gradients(model: nn.Module, job: Runtime) -> None:
    """Complete the gradients each tp rank holds only its part of (placed Partial by the plan: λ, subln, and the
    norms under sequence parallelism) by DTensor's redistribution to the parameter's placement, then average
    those that DDP and FSDP leave (_averaged_here) over the data-parallel ranks: expert shards over their
    replicas (each shard's gradient already sums its whole ep group's tokens), the rest over the ranks holding the
    same tensor-parallel shard; both divided by the data-parallel ranks (world size / tp: those reading different
    rows or positions)."""
    if not job.distributed:
        return
    averaged: dict[tuple[str, torch.dtype], list[torch.Tensor]] = {}  # (group, dtype) -> local gradients
    for param in model.parameters():
        if param.grad is None:
            continue
        if isinstance(param.grad, DTensor) and any(placement.is_partial() for placement in param.grad.placements):
            param.grad = param.grad.redistribute(placements=param.placements)
        if _averaged_here(param, job):
            key = ("replica" if _over_experts(param) else DATA, param.dtype)
            averaged.setdefault(key, []).append(local_tensor(param.grad))
    for (over, _), grads in averaged.items():
        for bucket in _buckets(grads):
            _average(bucket, job.group(over), job.data_ranks)


def _buckets(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The gradients in consecutive runs of at most BUCKET_BYTES (or one larger gradient)."""
    buckets: list[list[torch.Tensor]] = [[]]
    size = 0
    for grad in grads:
        if buckets[-1] and size + grad.nbytes > BUCKET_BYTES:
            buckets.append([])
            size = 0
        buckets[-1].append(grad)
        size += grad.nbytes
    return buckets


def _average(grads: list[torch.Tensor], group: dist.ProcessGroup, ranks: int) -> None:
    """Sum the gradients over the group in one all-reduce (flattened together), divided by `ranks`, in place."""
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    flat.div_(ranks)
    torch._foreach_copy_(grads, _unflatten_dense_tensors(flat, grads))


def _over_experts(param: torch.Tensor) -> bool:
    """A DTensor split over the ep dimension: an expert shard, whose replicas are the ranks of 'replica'."""
    return "ep" in param.device_mesh.mesh_dim_names


def _averaged_here(param: torch.Tensor, job: Runtime) -> bool:
    """Whether sync_gradients averages this parameter's gradient itself: under DDP every DTensor (DDP takes none),
    under FSDP the expert shards of Runtime.experts_whole_under_fsdp."""
    if not isinstance(param, DTensor):
        return False
    return job.ddp or (job.experts_whole_under_fsdp and _over_experts(param))


def clip_grad_norm(model: nn.Module, job: Runtime, max_norm: float) -> torch.Tensor:
    """Clip to the gradient norm of the whole model (returned): each piece's squares summed over the mesh
    dimensions its DTensor shards (after sync_gradients no part is partial and the ranks of a data-parallel group
    agree), whole gradients counted once."""
    grads: dict[tuple, list[torch.Tensor]] = {}
    for param in model.parameters():
        if param.grad is not None:
            grad, groups = param.grad, ()
            if isinstance(grad, DTensor):
                names = grad.device_mesh.mesh_dim_names
                groups = tuple(names[dim] for dim, placement in enumerate(grad.placements)
                               if isinstance(placement, SHARDED))  # sync_gradients left none Partial
            grads.setdefault(groups, []).append(local_tensor(grad))
    total = torch.zeros((), device=next(model.parameters()).device)
    for groups, group_grads in grads.items():
        norms = torch.stack(torch._foreach_norm(group_grads))
        squares = norms.to(compute_dtype(norms.dtype)).square().sum()
        for name in groups:
            dist.all_reduce(squares, group=job.group(name))
        total = total + squares
    norm = total.sqrt()
    if math.isfinite(max_norm):
        every = [g for group_grads in grads.values() for g in group_grads]
        torch._foreach_mul_(every, (max_norm / (norm + 1e-6)).clamp(max=1.0))
    return norm
