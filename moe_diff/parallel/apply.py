"""A finished model laid out over the job, from outside, in torchtitan's order: expert parallelism, tensor
parallelism (and the vocabulary split), activation checkpointing, per-block compile and FSDP, on the meta device;
then each rank allocates and fills just its pieces; then DDP, where asked, wraps the result."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel

from moe_diff.model import MoEDiffTransformer, init_parameter, parameter_generator
from moe_diff.parallel.dims import DATA, keep_shard, local_tensor
from moe_diff.parallel.expert_parallel import parallelize_experts
from moe_diff.parallel.plan import sharded_over_ep
from moe_diff.parallel.runtime import Runtime
from moe_diff.parallel.tensor_parallel import parallelize_tensor, parallelize_vocab


def parallelize(model: MoEDiffTransformer, job: Runtime) -> MoEDiffTransformer:
    """Expert parallelism over the ep groups, then tensor parallelism over the tp groups (so that it splits the
    local experts); the rest of the model stays replicated (data parallel)."""
    if job.dims.ep > 1:
        parallelize_experts(model, job.group("ep"))
    if job.dims.tp > 1:
        if job.vocab_parallel:
            parallelize_vocab(model, job.group("tp"))
        parallelize_tensor(model, job.group("tp"), job.sequence_parallel)
    return model


def checkpoint_activations(model: MoEDiffTransformer, scope: str) -> None:
    """Recompute activations in the backward pass instead of keeping them: each block's (`block`) or only each
    MoE layer's (`moe`: the expert rows, the largest activations; attention keeps its own); `none` keeps them all.
    The modules become subclasses named Checkpointed<Name>, so the module tree shows it and parameter names stay."""
    for block in model.layers:
        for module in {"none": [], "block": [block], "moe": [block.moe]}[scope]:
            module.__class__ = _checkpointed(type(module))


@functools.cache
def _checkpointed(cls: type[nn.Module]) -> type[nn.Module]:
    def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        return torch.utils.checkpoint.checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Checkpointed{cls.__name__}", (cls,), {"forward": forward})


def compile_blocks(model: MoEDiffTransformer) -> None:
    """torch.compile each block in place (its checkpointing inside the compiled region), as torchtitan does before
    FSDP: one compiled block serves every layer of the same shapes, and FSDP's and DDP's hooks stay outside."""
    for block in model.layers:
        block.compile()


def shard_fully(model: MoEDiffTransformer, job: Runtime) -> None:
    """fsdp: FSDP2 (`fully_shard`) per block and on the whole model over the ranks holding the same shards, each
    expert shard over its replicas, so parameters, gradients and optimizer states are split over the data-parallel
    ranks too; with parallel.dp_replicate > 1, HSDP: sharded within each of dp_replicate groups, replicated
    over them. Call on the meta device, before materialize()."""
    if not job.fsdp:
        return
    hsdp = job.dims.hsdp
    data_mesh = job.mesh["dp_replicate", "shard"] if hsdp else job.mesh[DATA]
    if job.experts_synced_by_hand:  # a one-rank group: the shard stays whole
        expert_mesh = job.mesh["dp_shard"]
    else:  # an expert shard's replicas; its gradient already sums its ep group's tokens
        expert_mesh = job.mesh["dp_replicate", "dp_shard"] if hsdp else job.mesh["replica"]
    for block in model.layers:
        if job.dims.ep > 1:
            experts = block.moe.experts
            fully_shard(experts, mesh=expert_mesh)
            if not job.experts_synced_by_hand:
                experts.set_gradient_divide_factor(float(job.data_ranks))
                experts.set_force_sum_reduction_for_comms(job.mesh.device_type == "cpu")  # gloo: no PREMUL_SUM
        fully_shard(block, mesh=data_mesh)
    fully_shard(model, mesh=data_mesh)


@torch.no_grad()
def materialize(model: MoEDiffTransformer, job: Runtime, device: torch.device, seed: int | None) -> None:
    """Allocate a model built on the meta device (parallelized, and fully sharded with FSDP, there) on `device`, so
    that no rank ever holds more than its pieces. With a seed, fill them as one process would initialise the whole
    model: each whole parameter drawn on the CPU from its own generator (model.parameter_generator), this rank's
    piece kept; without, leave them for a checkpoint to fill."""
    model.to_empty(device=device)
    if model.cfg.tie_embeddings:  # to_empty made the shared parameter two
        model.output.weight = model.tok_embeddings.weight
    for buffer in model.buffers():
        buffer.zero_()  # the expert biases: zero at the start, stored in checkpoints
    if seed is None:
        return
    for name, param in model.named_parameters():
        whole = torch.empty(job.whole_shape(name, param.shape), dtype=param.dtype)
        init_parameter(name, whole, model.cfg.n_layers, parameter_generator(seed, name))
        for split in job.splits(name):
            whole = keep_shard(whole, split.group, split.dim)
        if isinstance(param, DTensor):  # FSDP's piece of what expert and tensor parallelism left here
            shape, offset = compute_local_shape_and_global_offset(whole.shape, param.device_mesh, param.placements)
            whole = whole[tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))]
        local_tensor(param).copy_(whole)


def wrap(model: MoEDiffTransformer, job: Runtime) -> nn.Module:
    """The module the training step calls: the model itself, or with ddp DistributedDataParallel over the ranks
    holding the same shards (it averages gradients in buckets while the backward runs), expert shards left out of
    it to be averaged over their own replicas. Call after materialize(), before building the optimizer."""
    if not job.ddp:
        return model
    if job.experts_synced_by_hand:
        experts = [name for name, _ in model.named_parameters() if sharded_over_ep(name)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
    device_ids = [job.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=job.data_group,
                                   broadcast_buffers=False)
