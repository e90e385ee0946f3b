"""The job's layout over its processes, checked once, and the device mesh every process group comes from."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_diff.config import ConfigError, ParallelConfig


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    ep: int
    world_size: int

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """dp * tp must be the world size (dp inferred when null); ep must divide it."""
        dp = cfg.dp if cfg.dp is not None else world_size // cfg.tp
        if dp * cfg.tp != world_size:
            raise ConfigError(f"parallel.dp={cfg.dp} x parallel.tp={cfg.tp} must equal the world size {world_size} "
                              "(torchrun --nproc_per_node x nodes)")
        if world_size % cfg.ep:
            raise ConfigError(f"parallel.ep={cfg.ep} must divide the world size {world_size}")
        if cfg.tp > 1 and cfg.ep > 1:
            raise ConfigError(f"parallel.tp={cfg.tp} with parallel.ep={cfg.ep}: tensor and expert parallelism "
                              "together are not available yet; use one of them")
        return cls(dp, cfg.tp, cfg.ep, world_size)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 3-D mesh: 'tp' groups consecutive ranks that split every layer's heads and FFNs; 'ep' groups ranks
        that share one layer's experts between them; 'replica' groups the ranks holding the same parameters,
        over which gradients are averaged."""
        return init_device_mesh(device_type, (self.world_size // (self.ep * self.tp), self.ep, self.tp),
                                mesh_dim_names=("replica", "ep", "tp"))


def average_gradients(model: nn.Module, mesh: DeviceMesh) -> None:
    """Data-parallel averaging over the ranks that read different rows: with tensor parallelism, over the ranks
    holding the same shards (the tp group reads the same rows); else expert shards sum over the ranks that hold
    the same experts (each shard's gradient already sums its whole ep group's tokens), everything else over all."""
    world, replicas = mesh.size(), mesh["replica"].get_group()
    tensor_parallel = mesh["tp"].size() > 1
    for name, param in model.named_parameters():
        if param.grad is None:
            continue
        dist.all_reduce(param.grad, group=replicas if tensor_parallel or ".experts." in name else None)
        param.grad.div_(replicas.size() if tensor_parallel else world)
