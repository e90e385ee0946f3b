"""The training job's processes: torchrun's environment read once, the process group (NCCL on CUDA, gloo on CPU)
with a timeout so that a failed or hung rank ends the job instead of blocking it, the mesh, and the few
collectives the training loop needs (averaged gradients, the global gradient norm, reduced metrics)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moe_diff.config import ParallelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.dims import ParallelDims, average_gradients
from moe_diff.parallel.expert_parallel import parallelize_experts


def is_expert_parameter(name: str) -> bool:
    return ".experts." in name


@dataclass
class Runtime:
    """This process's place in the job; one process without torchrun."""

    dims: ParallelDims
    rank: int = 0
    local_rank: int = 0
    mesh: DeviceMesh | None = None

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
        if device.type == "cuda" and self.distributed:
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def parallelize(self, model: MoEDiffTransformer) -> MoEDiffTransformer:
        """Expert parallelism over the mesh's ep groups; the rest of the model stays replicated (data parallel)."""
        if self.dims.ep > 1:
            parallelize_experts(model, self.mesh["ep"].get_group())
        return model

    def average_gradients(self, model: nn.Module) -> None:
        if self.distributed:
            average_gradients(model, self.mesh)

    def clip_grad_norm(self, model: nn.Module, max_norm: float) -> torch.Tensor:
        """Clip to the gradient norm of the whole model (returned): replicated gradients count once, expert
        shards are summed over their ep group (after average_gradients every rank holds the same values)."""
        grads = {True: [], False: []}
        for name, param in model.named_parameters():
            if param.grad is not None:
                grads[is_expert_parameter(name)].append(param.grad)
        device = next(model.parameters()).device
        squares = [torch.stack(torch._foreach_norm(g)).float().square().sum() if g else torch.zeros((), device=device)
                   for g in (grads[True], grads[False])]
        if self.distributed and self.dims.ep > 1:
            dist.all_reduce(squares[0], group=self.mesh["ep"].get_group())
        norm = (squares[0] + squares[1]).sqrt()
        if math.isfinite(max_norm):
            torch._foreach_mul_(grads[True] + grads[False], (max_norm / (norm + 1e-6)).clamp(max=1.0))
        return norm

    def whole(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """A parameter (or its optimizer moment) as one process holds it: expert shards gathered whole."""
        if self.dims.ep == 1 or not is_expert_parameter(name) or value.dim() == 0:
            return value
        return gather_experts(value, self.mesh["ep"].get_group())

    def local(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """The inverse of whole(): this rank's rows of a whole expert tensor."""
        if self.dims.ep == 1 or not is_expert_parameter(name) or value.dim() == 0:
            return value
        return shard_experts(value, self.mesh["ep"].get_group())

    def reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """The tensor summed ('sum') or averaged ('mean') over every rank, in place; unchanged in one process."""
        if self.distributed:
            dist.all_reduce(tensor)
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
    return Runtime(dims, dist.get_rank(), local_rank, dims.build_mesh(device.type))


def gather_experts(local: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The whole [E, ...] tensor from each rank's [E/ep, ...] shard, on every rank of the group."""
    parts = [torch.empty_like(local) for _ in range(group.size())]
    dist.all_gather(parts, local.detach().contiguous(), group=group)
    return torch.cat(parts)


def shard_experts(full: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's [E/ep, ...] rows of a whole expert tensor (the layout parallelize_experts makes)."""
    n_local = full.shape[0] // group.size()
    return full[group.rank() * n_local:(group.rank() + 1) * n_local]
