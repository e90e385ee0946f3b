"""A finished model laid out over the job, from outside, in torchtitan's order: expert parallelism, tensor
parallelism (and the vocabulary split), with every parameter the plan splits made a DTensor of the job's mesh;
activation checkpointing, per-block compile and FSDP, on the meta device; then each rank allocates and fills just
its pieces; then DDP, where asked, wraps the result."""

from __future__ import annotations

import fnmatch
import functools
import inspect
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle, parallelize_module
from torch.nn.parallel import DistributedDataParallel

from moe_diff.model import MoEDiffTransformer, init_parameter, parameter_generator
from moe_diff.parallel.dims import DATA
from moe_diff.parallel.pieces import piece
from moe_diff.parallel.plan import TensorPlacement, layout, module_plan
from moe_diff.parallel.runtime import Runtime
from moe_diff.parallel.tensor_parallel import check_tensor_parallel


def parallelize(model: MoEDiffTransformer, job: Runtime) -> MoEDiffTransformer:
    """Expert, tensor and context parallelism over the ep, tp and cp groups (the plan's styles: which modules run
    their part, and where activations cross ranks), then every parameter laid out as the plan says; the rest of
    the model stays replicated (data parallel)."""
    if job.dims.tp > 1:
        check_tensor_parallel(model, job.dims.tp, job.vocab_parallel)
    dims = job.dims
    for dim, styles in module_plan(dims.ep, dims.tp, dims.cp, job.vocab_parallel, job.sequence_parallel).items():
        check_paths(model, styles)
        parallelize_module(model, job.submesh(dim), styles)
    distribute_parameters(model, job)
    return model


def check_paths(model: nn.Module, styles: dict[str, ParallelStyle]) -> None:
    """Every module path of the plan names some module of the model (parallelize_module only warns, and a layer
    left whole would compute wrong sums without an error)."""
    names = [name for name, _ in model.named_modules()]
    for path in styles:
        if not any(fnmatch.fnmatchcase(name, path) for name in names):
            raise LookupError(f"moe_diff/parallel/plan.py module_plan names {path!r}, which matches no module "
                                     "of the model")


def distribute_parameters(model: MoEDiffTransformer, job: Runtime) -> None:
    """Each parameter the plan splits in this job (or whose gradient it sums over tp) becomes a DTensor of the job's
    mesh holding this rank's piece, its global shape the single-process one; the modules holding one read it as
    that piece (Local<Name>), its gradient placed as the plan says (Partial where each rank's is its part)."""
    made: dict[int, nn.Parameter] = {}
    meshes: dict[tuple[str, ...], DeviceMesh] = {}
    for prefix, module in model.named_modules():
        local_reads: dict[str, tuple[DeviceMesh, tuple[TensorPlacement, ...]]] = {}
        for qualified, param in list(module.named_parameters(prefix, recurse=False)):
            spec = layout(qualified, job.dims.ep, job.dims.tp, job.vocab_parallel, job.sequence_parallel)
            if spec is None:
                continue
            if spec.mesh_dims not in meshes:
                meshes[spec.mesh_dims] = job.submesh(spec.mesh_dims)
            mesh = meshes[spec.mesh_dims]
            if id(param) not in made:  # a tied head shares the embedding's
                piece_of = distribute_tensor(param.detach(), mesh, spec.placements, src_data_rank=None)
                made[id(param)] = nn.Parameter(piece_of, requires_grad=param.requires_grad)
            name = qualified.rpartition(".")[2]
            setattr(module, name, made[id(param)])
            local_reads[name] = (mesh, spec.grad_placements)
        if local_reads:
            module.__class__ = _reading_pieces(type(module))
            module.local_reads = local_reads


@functools.cache
def _reading_pieces(cls: type[nn.Module]) -> type[nn.Module]:
    """The module's own code, unchanged, computing on this rank's pieces of its DTensor parameters: reading one
    as an attribute gives the piece, a view that autograd carries back to the parameter (so its .grad is None:
    read parameters themselves through named_parameters)."""
    def __getattr__(self: nn.Module, name: str) -> Any:
        value = cls.__getattr__(self, name)
        if isinstance(value, DTensor) and name in self.local_reads:
            mesh, grad_placements = self.local_reads[name]
            if value.device_mesh == mesh:  # not FSDP's shard of it, which FSDP makes whole (a piece of ours) to run
                return value.to_local(grad_placements=grad_placements)
        return value

    return type(f"Local{cls.__name__}", (cls,), {"__getattr__": __getattr__})


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
    data_mesh = job.submesh(("dp_replicate", "shard")) if hsdp else job.submesh(DATA)
    if job.experts_whole_under_fsdp:  # a one-rank group: the shard stays whole
        expert_mesh = job.submesh("expert_shard")
    else:  # an expert shard's replicas; its gradient already sums its ep group's tokens
        expert_mesh = job.submesh(("dp_replicate", "expert_shard")) if hsdp else job.submesh("replica")
    for block in model.layers:
        if job.dims.ep > 1:
            experts = block.moe.experts
            fully_shard(experts, mesh=expert_mesh)
            if not job.experts_whole_under_fsdp:
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
        model.output.weight = dict(model.tok_embeddings.named_parameters())["weight"]  # the parameter, not a piece
    for buffer in model.buffers():
        buffer.zero_()  # the expert biases: zero at the start, stored in checkpoints
    if seed is None:
        return
    for name, param in model.named_parameters():
        whole = torch.empty(param.shape, dtype=param.dtype)  # a DTensor's shape is the single-process one
        init_parameter(name, whole, model.cfg.n_layers, parameter_generator(seed, name))
        offset, local, _ = piece(param)
        local.copy_(whole[tuple(slice(start, start + size) for start, size in zip(offset, local.shape, strict=True))])


def wrap(model: MoEDiffTransformer, job: Runtime) -> nn.Module:
    """The module the training step calls: the model itself, or with ddp DistributedDataParallel over the ranks
    holding the same shards (it averages gradients in buckets while the backward runs), the DTensor parameters
    (split over the mesh, or with gradients summed over tp) left out of it for sync_gradients. Call after
    materialize(), before building the optimizer."""
    if not job.ddp:
        return model
    split = [name for name, param in model.named_parameters(remove_duplicate=False)  # a tied head's name too
             if isinstance(param, DTensor)]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, split)
    device_ids = [job.local_rank] if next(model.parameters()).is_cuda else None
    return DistributedDataParallel(model, device_ids=device_ids, process_group=job.data_group, **_NO_BUFFER_SYNC)


# the buffers (expert biases) are kept equal by global counts, so DDP never re-broadcasts them before a forward;
# torch 2.13 names this forward_sync_buffers (and warns at broadcast_buffers), earlier releases broadcast_buffers
_NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                   else {"broadcast_buffers": False})
