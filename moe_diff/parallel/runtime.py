"""The training job's processes: torchrun's environment read once, the process group (NCCL on CUDA, gloo on CPU)
with a timeout so that a failed or hung rank ends the job instead of blocking it, the mesh, and the few
collectives the training loop needs (averaged gradients, the global gradient norm, reduced metrics)."""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from torch.nn.parallel import DistributedDataParallel

from moe_diff.config import ParallelConfig
from moe_diff.model import MoEDiffTransformer, init_parameter
from moe_diff.parallel.dims import ParallelDims, average_gradients, is_expert_parameter, keep_shard
from moe_diff.parallel.expert_parallel import parallelize_experts
from moe_diff.parallel.tensor_parallel import has_partial_gradient, parallelize_tensor, parallelize_vocab, shard_dim

DATA_DIMS = ("replica", "ep")  # FSDP splits the non-expert parameters over these, flattened into one "data"
FLATTENED = {"data": DATA_DIMS}


@dataclass
class Runtime:
    """This process's place in the job; one process without torchrun."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    mesh: DeviceMesh | None = None
    data_group: dist.ProcessGroup | None = None  # ranks holding the same tensor-parallel shard (None: all)
    data_parallel: str = "allreduce"
    vocab_parallel: bool = False  # the tp groups also split the embedding and output head by vocabulary rows
    _split_meshes: dict[tuple, DeviceMesh] = field(default_factory=dict)

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU (torchrun's LOCAL_RANK) when the job runs on CUDA."""
        if device.type == "cuda" and self.distributed:  # start() made it the current device
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def data_rank(self) -> int:
        """Which rows of the global batch this rank reads: the ranks of one tp group read the same."""
        return self.rank // self.dims.tp

    @property
    def data_ranks(self) -> int:
        return self.world_size // self.dims.tp

    def parallelize(self, model: MoEDiffTransformer) -> MoEDiffTransformer:
        """Tensor parallelism over the tp groups, expert parallelism over the ep groups; the rest of the model
        stays replicated (data parallel)."""
        if self.dims.ep > 1:  # first, so that the tensor-parallel split applies to the local experts
            parallelize_experts(model, self.mesh["ep"].get_group())
        if self.dims.tp > 1:
            parallelize_tensor(model, self.mesh["tp"].get_group())
            if self.vocab_parallel:
                parallelize_vocab(model, self.mesh["tp"].get_group())
        return model

    @torch.no_grad()
    def materialize(self, model: MoEDiffTransformer, device: torch.device, seed: int | None) -> None:
        """Allocate a model built on the meta device (parallelized, and fully sharded with FSDP, there) on
        `device`, so that no rank ever holds more than its pieces. With a seed, fill them as one process would
        initialise the whole model: each whole parameter drawn in turn on the CPU, this rank's piece kept;
        without, leave them for a checkpoint to fill."""
        model.to_empty(device=device)
        if model.cfg.tie_embeddings:  # to_empty made the shared parameter two
            model.output.weight = model.tok_embeddings.weight
        for buffer in model.buffers():
            buffer.zero_()  # the expert biases: zero at the start, stored in checkpoints
        if seed is None:
            return
        generator = torch.Generator().manual_seed(seed)
        for name, param in model.named_parameters():
            whole = torch.empty(self._whole_shape(name, param.shape), dtype=param.dtype)
            init_parameter(name, whole, model.cfg.n_layers, generator)
            for group, dim, _ in self._named_splits(name):
                whole = keep_shard(whole, group, dim)
            if isinstance(param, DTensor):  # FSDP's piece of what expert and tensor parallelism left here
                shape, offset = compute_local_shape_and_global_offset(whole.shape, param.device_mesh,
                                                                      param.placements)
                whole = whole[tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))]
            local_tensor(param).copy_(whole)

    @property
    def ddp(self) -> bool:
        return self.distributed and self.data_parallel == "ddp"

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.data_parallel == "fsdp"

    def shard_fully(self, model: MoEDiffTransformer) -> None:
        """fsdp: FSDP2 (`fully_shard`) per block and on the whole model over the ranks holding the same shards,
        each expert shard over its replicas, so parameters, gradients and optimizer states are split over the
        data-parallel ranks too. Call on the meta device, before materialize()."""
        if not self.fsdp:
            return
        data_mesh = self.mesh[DATA_DIMS]._flatten("data")
        for block in model.layers:
            if self.dims.ep > 1:  # an expert shard's replicas; its gradient already sums its ep group's tokens
                fully_shard(block.moe.experts, mesh=self.mesh["replica"])
                block.moe.experts.set_gradient_divide_factor(float(self.data_ranks))
            fully_shard(block, mesh=data_mesh)
        fully_shard(model, mesh=data_mesh)

    def wrap(self, model: MoEDiffTransformer) -> nn.Module:
        """The module the training step calls: the model itself, or with ddp DistributedDataParallel over the
        ranks holding the same shards (it averages gradients in buckets while the backward runs), expert shards
        left out of it to be averaged over their own replicas. Call after materialize(), before building the
        optimizer."""
        if not self.ddp:
            return model
        if self.dims.ep > 1:
            experts = [name for name, _ in model.named_parameters() if is_expert_parameter(name)]
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, experts)
        device_ids = [self.local_rank] if next(model.parameters()).is_cuda else None
        return DistributedDataParallel(model, device_ids=device_ids, process_group=self.data_group,
                                       broadcast_buffers=False)

    def accumulating(self, module: nn.Module, last: bool) -> contextlib.AbstractContextManager:
        """Gradients averaged once per step: DDP's no_sync, or FSDP's gradient sync, off but for the last
        micro-batch."""
        if self.fsdp:
            module.set_requires_gradient_sync(last)
        return module.no_sync() if self.ddp and not last else contextlib.nullcontext()

    def average_gradients(self, model: nn.Module) -> None:
        """Sum the gradients that tensor parallelism left partial over the tp group, then average over the
        data-parallel ranks (DDP leaves only the expert shards to average; FSDP none)."""
        if not self.distributed:
            return
        if self.dims.tp > 1:
            for name, param in model.named_parameters():
                if param.grad is not None and has_partial_gradient(name):
                    dist.all_reduce(local_tensor(param.grad), group=self.mesh["tp"].get_group())
        if self.data_parallel == "allreduce":
            average_gradients(model, self.mesh, self.data_group)
        elif self.ddp and self.dims.ep > 1:
            average_gradients(model, self.mesh, self.data_group, only=is_expert_parameter)

    def _named_splits(self, name: str) -> list[tuple[dist.ProcessGroup, int, str]]:
        """The mesh dimensions a parameter is split over, outermost first (expert parallelism shards the whole
        experts that tensor parallelism then splits), with the tensor dimension each splits."""
        splits = []
        if self.dims.ep > 1 and is_expert_parameter(name):
            splits.append((self.mesh["ep"].get_group(), 0, "ep"))
        if self.dims.tp > 1 and (dim := shard_dim(name, self.vocab_parallel)) is not None:
            splits.append((self.mesh["tp"].get_group(), dim, "tp"))
        return splits

    def _whole_shape(self, name: str, shape: torch.Size) -> torch.Size:
        """The single-process shape of a parameter of which this rank holds `shape` after expert and tensor
        parallelism."""
        whole = list(shape)
        for group, dim, _ in self._named_splits(name):
            whole[dim] *= group.size()
        return torch.Size(whole)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the gradient norm of the whole model (returned): whole gradients count once, split ones are
        summed over their groups (after average_gradients the ranks of a data-parallel group agree; FSDP's
        shards are summed over its mesh)."""
        grads: dict[tuple, list[torch.Tensor]] = {}
        for name, param in model.named_parameters():
            if param.grad is not None:
                groups = tuple(group for group, _, _ in self._named_splits(name))
                if isinstance(param.grad, DTensor):
                    groups += (param.grad.device_mesh.get_group(),)
                grads.setdefault(groups, []).append(local_tensor(param.grad))
        total = torch.zeros((), device=next(model.parameters()).device)
        for groups, group_grads in grads.items():
            squares = torch.stack(torch._foreach_norm(group_grads)).float().square().sum()
            for group in groups:
                dist.all_reduce(squares, group=group)
            total = total + squares
        norm = total.sqrt()
        if math.isfinite(max_norm):
            every = [g for group_grads in grads.values() for g in group_grads]
            torch._foreach_mul_(every, (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def global_view(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a parameter (or of its optimizer moment) placed in the whole tensor: a DTensor
        whose global shape is the single-process one, split as expert parallelism (experts), tensor parallelism
        (SHARD_DIMS) and FSDP (dim 0 of what those leave) split it, outermost first; whole tensors unchanged.
        torch.distributed.checkpoint writes each piece once and reads any layout into any other through it."""
        if not value.dim():
            return value
        shape = self._whole_shape(name, value.shape)  # an FSDP DTensor's shape is that of the tensor it splits
        splits = [((group_name,), dim) for _, dim, group_name in self._named_splits(name)]
        if isinstance(value, DTensor):
            (placement,) = value.placements
            splits.append((FLATTENED.get(value.device_mesh.mesh_dim_names[0], value.device_mesh.mesh_dim_names),
                           placement.dim))
            value = value.to_local()
        if not splits:
            return value
        mesh = self._split_mesh(tuple(names for names, _ in splits))
        strides = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(value, mesh, [Shard(dim) for _, dim in splits], shape=shape, stride=strides)

    def _split_mesh(self, groups: tuple[tuple[str, ...], ...]) -> DeviceMesh:
        """A mesh of the ranks that share this rank's coordinates outside `groups`, one dimension per group of
        the job mesh's dimensions (flattened when several), in the given order; no process group is made."""
        if groups not in self._split_meshes:
            names, coordinates = list(self.mesh.mesh_dim_names), self.mesh.get_coordinate()
            chosen = [name for group in groups for name in group]
            rest = [name for name in names if name not in chosen]
            ranks = self.mesh.mesh.permute([names.index(name) for name in rest + chosen])
            ranks = ranks[tuple(coordinates[names.index(name)] for name in rest)]
            ranks = ranks.reshape([math.prod(self.mesh.size(names.index(name)) for name in group) for group in groups])
            self._split_meshes[groups] = DeviceMesh(self.mesh.device_type, ranks, _init_backend=False,
                                                    mesh_dim_names=tuple("_".join(group) for group in groups))
        return self._split_meshes[groups]

    def expert_rows(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A layer's expert weights as this rank holds them, made whole but for expert parallelism (FSDP and
        tensor-parallel shards gathered), and the index of the first of those experts in the layer."""
        if isinstance(value, DTensor):
            value = value.full_tensor()
        first = 0
        for group, dim, group_name in self._named_splits(name):
            if group_name == "tp":
                value = gather_shards(value, group, dim)
            else:
                first = group.rank() * value.shape[0]
        return value, first

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def reduce(self, tensor: torch.Tensor, op: str, data_parallel: bool = False) -> torch.Tensor:
        """The tensor summed ('sum') or averaged ('mean') over every rank, in place (data_parallel: over one
        rank per tp group, for counts of rows that a tp group shares); unchanged in one process."""
        if self.distributed:
            dist.all_reduce(tensor)
            if data_parallel:
                tensor.div_(self.dims.tp)
            if op == "mean":
                tensor.div_(self.world_size)
        return tensor

    def any(self, flag: bool, device: torch.device) -> bool:
        """True on every rank when it is True on any (e.g. one rank got SIGTERM)."""
        if not self.distributed:
            return flag
        value = torch.tensor([float(flag)], device=device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def shutdown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def start(cfg: ParallelConfig, device: torch.device) -> Runtime:
    """Join torchrun's process group (nccl on CUDA, gloo on CPU) when WORLD_SIZE > 1 and build the mesh."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    dims = ParallelDims.from_config(cfg, world_size)
    if world_size == 1:
        return Runtime(dims)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=cfg.timeout_s))
    mesh = dims.build_mesh(device.type)
    data_group = None
    if dims.tp > 1:  # one group per tp index: the ranks that hold the same shards but read different rows
        data_group, _ = dist.new_subgroups_by_enumeration(
            [list(range(index, world_size, dims.tp)) for index in range(dims.tp)])
    return Runtime(dims, dist.get_rank(), local_rank, mesh, data_group, cfg.data_parallel, cfg.vocab_parallel)


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (FSDP's parameters and gradients), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def gather_shards(local: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """The whole tensor from each rank's block along `dim`, on every rank of the group."""
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts, dim=dim)
