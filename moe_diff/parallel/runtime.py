"""The training job's processes: torchrun's environment read once, the process group (NCCL on CUDA, gloo on CPU)
with a timeout so that a failed or hung rank ends the job instead of blocking it, the mesh, and the few
collectives the training loop needs (gathered objects, reduced metrics, one flag)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from moe_diff.config import ParallelConfig
from moe_diff.parallel.dims import DATA, FLATTENED, ParallelDims


@dataclass
class Runtime:
    """This process's place in the job; one process without torchrun."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    mesh: DeviceMesh | None = None
    data_parallel: str = "ddp"
    vocab_parallel: bool = False  # the tp groups also split the embedding and output head by vocabulary rows
    sequence_parallel: bool = False  # and, in training, the residual stream and its norms by sequence
    _groups: dict[str, dist.ProcessGroup] = field(default_factory=dict, repr=False)

    @property
    def data_group(self) -> dist.ProcessGroup | None:
        """The ranks holding the same tensor-parallel shard and reading different rows or positions (None in one
        process)."""
        return self.group(DATA) if self.distributed else None

    def group(self, dim: str) -> dist.ProcessGroup:
        """This rank's process group along mesh dimension `dim` (one of MESH_DIMS or FLATTENED), looked up once (a
        lookup in the mesh reads its rank table)."""
        if dim not in self._groups:
            self._groups[dim] = self.submesh(dim).get_group()
        return self._groups[dim]

    def submesh(self, dims: str | tuple[str, ...]) -> DeviceMesh:
        """The mesh along one dimension or several; a flattened one (FLATTENED) taken from the dimensions it
        stands for, as torch asks (slicing it from the whole mesh is deprecated)."""
        if isinstance(dims, str):
            return self.mesh[FLATTENED[dims]]._flatten(dims) if dims in FLATTENED else self.mesh[dims]
        if any(dim in FLATTENED for dim in dims):  # HSDP's ('dp_replicate', 'shard'), say
            return DeviceMesh._concatenate([self.submesh(dim) for dim in dims])
        return self.mesh[dims]

    @property
    def world_size(self) -> int:
        return self.dims.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    @property
    def ddp(self) -> bool:
        return self.distributed and self.data_parallel == "ddp"

    @property
    def fsdp(self) -> bool:
        return self.distributed and self.data_parallel == "fsdp"

    @property
    def experts_whole_under_fsdp(self) -> bool:
        """FSDP with expert shards that no other rank of the shard's (HSDP) group holds: each rank keeps its shard
        whole and sync_gradients averages it over its replicas (FSDP2 divides the gradient of a one-rank group by a
        set divide factor twice where it reduces by sums, as on gloo and in float64)."""
        return self.fsdp and self.dims.ep > 1 and self.dims.dp_shard * self.dims.cp == 1

    def device(self, device: torch.device) -> torch.device:
        """This rank's GPU (torchrun's LOCAL_RANK) when the job runs on CUDA."""
        if device.type == "cuda" and self.distributed:  # start() made it the current device
            return torch.device("cuda", self.local_rank)
        return device

    @property
    def data_rank(self) -> int:
        """Which rows of the global batch this rank reads: the ranks of one cp x tp group read the same."""
        return self.rank // (self.dims.cp * self.dims.tp)

    @property
    def row_readers(self) -> int:
        """How many ranks read different rows of each batch."""
        return self.world_size // (self.dims.cp * self.dims.tp)

    @property
    def cp_rank(self) -> int:
        """Which positions of its rows this rank holds (parallel.cp): its rank in the cp group, as the attention
        that exchanges keys over that group reads it."""
        return self.group("cp").rank() if self.dims.cp > 1 else 0

    @property
    def data_ranks(self) -> int:
        """The ranks over which gradients are averaged: every one holding the same tp shard (reading different rows
        or positions)."""
        return self.world_size // self.dims.tp

    def gather_objects(self, value: Any) -> list[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """The tensor summed ('sum') or averaged ('mean') over every rank, in place; unchanged in one process."""
        if self.distributed:
            dist.all_reduce(tensor)
            if op == "mean":
                tensor.div_(self.world_size)
        return tensor

    def sum_over_data(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed, in place, over the ranks that read different rows or positions of the batch (one per
        tp group); unchanged in one process. Not differentiable: for counts."""
        if self.distributed:
            dist.all_reduce(tensor, group=self.data_group)
        return tensor

    def maximum(self, values: list[float], device: torch.device) -> list[float]:
        """Each value's maximum over the ranks, on every rank (one all-reduce and one read)."""
        if not self.distributed:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor.tolist()

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
    return Runtime(dims, dist.get_rank(), local_rank, dims.build_mesh(device.type), cfg.data_parallel,
                   cfg.vocab_parallel, cfg.sequence_parallel)
