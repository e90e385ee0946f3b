"""The job's layout over its processes, checked once, and the device mesh every process group comes from."""

from __future__ import annotations

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moe_diff.config import ConfigError, ParallelConfig

MESH_DIMS = ("dp_replicate", "dp_shard", "ep", "cp", "tp")
FLATTENED = {  # the mesh's flattened dimensions and the dimensions each stands for
    "replica": ("dp_replicate", "dp_shard", "cp"),  # the ranks holding the same expert shard
    # the ranks holding the same tp shard, reading different rows or positions: data parallelism's group
    "data": ("dp_replicate", "dp_shard", "ep", "cp"),
    "shard": ("dp_shard", "ep", "cp"),  # HSDP: the ranks sharding each parameter between them
    "expert_shard": ("dp_shard", "cp"),  # FSDP: the ranks sharding each expert shard between them in a group
}
DATA = "data"


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    ep: int
    world_size: int
    dp_replicate: int = 1  # HSDP: the data-parallel ranks as dp_replicate groups, each sharding every parameter
    cp: int = 1  # context parallelism: each sequence split along its length over groups of cp ranks

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """dp * cp * tp must be the world size (dp inferred when null); ep * cp * tp must divide it."""
        split = cfg.cp * cfg.tp  # the ranks reading the same rows
        named = f"parallel.cp={cfg.cp} x parallel.tp={cfg.tp}" if cfg.cp > 1 else f"parallel.tp={cfg.tp}"
        dp = cfg.dp if cfg.dp is not None else world_size // split
        if dp * split != world_size and cfg.dp is None:
            divisors = [str(d) for d in range(1, world_size + 1) if world_size % d == 0]
            raise ConfigError(f"{named} must divide the world size {world_size} (torchrun --nproc_per_node x "
                              f"nodes): run a multiple of {split} processes under torchrun, or set "
                              + (f"parallel.cp and parallel.tp so that their product divides it ({', '.join(divisors)})"
                                 if cfg.cp > 1 else f"parallel.tp={' or '.join(divisors)}"))
        if dp * split != world_size:
            raise ConfigError(f"parallel.dp={cfg.dp} x {named} must equal the world size {world_size} "
                              f"(torchrun --nproc_per_node x nodes): run {cfg.dp * split} processes, or set "
                              "parallel.dp=null to use them all")
        if world_size % cfg.ep:
            raise ConfigError(f"parallel.ep={cfg.ep} must divide the world size {world_size}")
        if world_size % (cfg.ep * split):
            raise ConfigError(f"parallel.ep={cfg.ep} x {named} must divide the world size {world_size}")
        replicas = world_size // (cfg.ep * split)
        if replicas % cfg.dp_replicate:
            holders = "groups of parallel.cp ranks" if cfg.cp > 1 else "ranks"
            raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} must divide the {replicas} {holders} "
                              f"holding the same expert shard (world size {world_size} / parallel.ep="
                              f"{cfg.ep} / {named.replace(' x ', ' / ')})")
        dims = cls(dp, cfg.tp, cfg.ep, world_size, cfg.dp_replicate, cfg.cp)
        if dims.hsdp and dims.dp_shard * dims.ep * dims.cp == 1:  # the flattened 'shard' dimension
            raise ConfigError(f"parallel.dp_replicate={cfg.dp_replicate} leaves each HSDP group one rank, which shards "
                              "nothing: use parallel.data_parallel=ddp to replicate the model, or a smaller "
                              "parallel.dp_replicate")
        return dims

    @property
    def hsdp(self) -> bool:
        return self.dp_replicate > 1

    @property
    def dp_shard(self) -> int:
        """The groups of cp ranks that shard an expert shard between them under FSDP (its replicas within one HSDP
        group, with their cp ranks)."""
        return self.world_size // (self.ep * self.cp * self.tp * self.dp_replicate)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """A 5-D mesh: 'tp' groups consecutive ranks that split every layer's heads and FFNs; 'cp' groups ranks
        that split every sequence along its length; 'ep' groups ranks that share one layer's experts between them;
        'dp_shard' and 'dp_replicate' (outermost: across nodes) group the ranks holding the same expert shard,
        within and across HSDP's sharding groups (dp_replicate is 1 but for HSDP). FLATTENED names their
        products: 'replica', DATA (the data-parallel ranks), 'shard' and 'expert_shard'."""
        mesh = init_device_mesh(device_type, (self.dp_replicate, self.dp_shard, self.ep, self.cp, self.tp),
                                mesh_dim_names=MESH_DIMS)
        for name, dims in FLATTENED.items():
            mesh[dims]._flatten(name)
        return mesh
