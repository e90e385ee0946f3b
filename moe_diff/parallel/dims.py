"""The job's layout over its processes, checked once, and the device mesh every process group comes from."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_diff.config import ConfigError, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "ep", "tp")
FLATTENED = {  # the mesh's flattened dimensions and the dimensions each stands for
    "replica": ("dp_replicate", "dp_shard"),  # the ranks holding the same expert shard
    "data": ("dp_replicate", "dp_shard", "ep"),  # the ranks reading different rows: data parallelism's group
    "shard": ("dp_shard", "ep"),  # HSDP: the ranks sharding each parameter between them
}
DATA = "data"


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    ep: int
    world_size: int
    dp_replicate: int = 1  # HSDP: the data-parallel ranks as dp_replicate groups, each sharding every parameter

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """dp * tp must be the world size (dp inferred when null); ep must divide it."""
        dp = cfg.dp if cfg.dp is not None else world_size // cfg.tp
        if dp * cfg.tp != world_size and cfg.dp is None:
            divisors = [str(d) for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(f"parallel.tp={cfg.tp} must divide the world size {world_size} (torchrun "
                              f"--nproc_per_node x nodes): run a multiple of {cfg.tp} processes under torchrun, or "
                              f"set parallel.tp={' or '.join(divisors)}")
        if dp * cfg.tp != world_size:
            raise ConfigError(f"parallel.dp={cfg.dp} x parallel.tp={cfg.tp} must equal the world size {world_size} "
                              f"(torchrun --nproc_per_node x nodes): run {cfg.dp * cfg.tp} processes, or set "
                              "parallel.dp=null to use them all")
        if world_size % cfg.ep:
            raise ConfigError(f"parallel.ep={cfg.ep} must divide the world size {world_size}")
        if world_size % (cfg.ep * cfg.tp):
            raise ConfigError(f"parallel.ep={cfg.ep} x parallel.tp={cfg.tp} must divide the world size {world_size}")
        replicas = world_size // (cfg.ep * cfg.tp)
        if replicas % cfg.dp_replicate:
            raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} must divide the {replicas} ranks holding the "
                              f"same expert shard (world size {world_size} / parallel.ep={cfg.ep} / parallel.tp="
                              f"{cfg.tp})")
        dims = cls(dp, cfg.tp, cfg.ep, world_size, cfg.dp_replicate)
        if dims.hsdp and dims.dp_shard * dims.ep == 1:  # the flattened 'shard' dimension
            raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} leaves each HSDP group one rank, which shards "
                              "nothing: use parallel.data_parallel=ddp to replicate the model, or a smaller "
                              "parallel.dp_replicate")
        return dims

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard(self) -> int:
        """The ranks that shard an expert shard between them under FSDP (its replicas within one HSDP group)."""
        return self.world_size // (self.ep * self.tp * self.dp_replicate)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 4-D mesh: 'tp' groups consecutive ranks that split every layer's heads and FFNs; 'ep' groups ranks
        that share one layer's experts between them; 'dp_shard' and 'dp_replicate' (outermost: across nodes)
        group the ranks holding the same expert shard, within and across HSDP's sharding groups (dp_replicate is
        1 but for HSDP). FLATTENED names their products: 'replica', DATA (the data-parallel ranks) and
        'shard'."""
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.ep, self.tp),
                                mesh_dim_names=MESH_DIMS)
        for name, dims in FLATTENED.items():
            mesh[dims]._flatten(name)
        return mesh
