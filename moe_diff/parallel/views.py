"""Each rank's pieces seen as parts of the single-process tensors, for checkpoints: DTensors on small meshes that
create no process groups, so torch.distributed.checkpoint writes each piece once and reads any layout into any
other; each piece with its offset in the whole tensor (for the expert fingerprints); and each rank's experts made
whole for the SHA-256 tables of earlier versions."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from moe_diff.parallel.dims import FLATTENED
from moe_diff.parallel.runtime import Runtime, gather_shards


class Piece(NamedTuple):
    """This rank's block of a whole tensor: where it starts, its values, and the whole tensor's shape."""

    offset: tuple[int, ...]
    local: torch.Tensor
    whole_shape: torch.Size


class CheckpointViews:
    """The global view of this rank's tensors in one job (its small meshes made once)."""

    def __init__(self, job: Runtime):
        self.job = job
        self._meshes: dict[tuple, DeviceMesh] = {}

    def global_view(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """This rank's piece of a parameter (or of its optimizer moment) placed in the whole tensor: a DTensor whose
        global shape is the single-process one, split as expert and tensor parallelism (the plan) and
        FSDP (dim 0 of what those leave) split it, outermost first; whole tensors unchanged."""
        if not value.dim():
            return value
        shape = self.job.whole_shape(name, value.shape)  # an FSDP DTensor's shape is that of the tensor it splits
        splits = [((split.mesh_dim,), split.dim) for split in self.job.splits(name)]
        if isinstance(value, DTensor):  # FSDP shards over one mesh dimension (HSDP: replicated over another)
            splits += [(FLATTENED.get(mesh_dim, (mesh_dim,)), placement.dim)
                       for mesh_dim, placement in zip(value.device_mesh.mesh_dim_names, value.placements, strict=True)
                       if placement.is_shard()]
            value = value.to_local()
        if not splits:
            return value
        mesh = self._mesh(tuple(names for names, _ in splits))
        strides = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(value, mesh, [Shard(dim) for _, dim in splits], shape=shape, stride=strides)

    def piece(self, name: str, value: torch.Tensor) -> Piece:
        """This rank's piece of a parameter (or of its gradient) and its offset in the whole tensor."""
        placed = self.global_view(name, value)
        if not isinstance(placed, DTensor):
            return Piece((0,) * placed.dim(), placed, placed.shape)
        _, offset = compute_local_shape_and_global_offset(placed.shape, placed.device_mesh, placed.placements)
        return Piece(tuple(offset), placed.to_local(), placed.shape)

    def _mesh(self, groups: tuple[tuple[str, ...], ...]) -> DeviceMesh:
        """A mesh of the ranks that share this rank's coordinates outside `groups`, one dimension per group of the
        job mesh's dimensions (flattened when several), in the given order; no process group is made."""
        if groups not in self._meshes:
            job_mesh = self.job.mesh
            names, coordinates = list(job_mesh.mesh_dim_names), job_mesh.get_coordinate()
            chosen = [name for group in groups for name in group]
            rest = [name for name in names if name not in chosen]
            ranks = job_mesh.mesh.permute([names.index(name) for name in rest + chosen])
            ranks = ranks[tuple(coordinates[names.index(name)] for name in rest)]
            ranks = ranks.reshape([math.prod(job_mesh.size(names.index(name)) for name in group) for group in groups])
            self._meshes[groups] = DeviceMesh(job_mesh.device_type, ranks, _init_backend=False,
                                              mesh_dim_names=tuple("_".join(group) for group in groups))
        return self._meshes[groups]

    def expert_rows(self, name: str, value: torch.Tensor) -> tuple[torch.Tensor, int]:
        """A layer's expert weights as this rank holds them, made whole but for expert parallelism (FSDP and
        tensor-parallel shards gathered), and the index of the first of those experts in the layer."""
        if isinstance(value, DTensor):
            value = value.full_tensor()
        first = 0
        for split in self.job.splits(name):
            if split.mesh_dim == "tp":
                value = gather_shards(value, split.group, split.dim)
            else:
                first = split.group.rank() * value.shape[0]
        return value, first
