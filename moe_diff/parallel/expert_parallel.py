"""Expert parallelism: each rank of a process group keeps n_experts / ep of every layer's experts, and the
(token, slot) pairs travel to their expert's rank and back with all-to-all (uneven splits, counts sent first,
autograd through both exchanges). No [tokens x experts] tensor is exchanged: only the rows that were routed, less
those dropped for capacity, which stay behind.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from moe_diff.config import ConfigError
from moe_diff.model import Experts, count_ids
from moe_diff.parallel.collectives import exchange


def _exchange_counts(send: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """How many rows each rank will send here for each local expert [ep, L], from the `send` [E] rows this rank
    sends to each expert of the layer."""
    received = torch.empty_like(send)
    dist.all_to_all_single(received, send, group=group)
    return received.view(group.size(), -1)


class ExpertParallelExperts(Experts):
    """A layer's experts sharded over a group (ExpertParallel makes a layer's experts these): the same parameters,
    of which this rank holds E/ep experts once they are laid out as the plan says (apply.distribute_parameters)."""

    group: dist.ProcessGroup

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Pairs sorted by expert (so by owning rank, and by local expert within) are sent, computed here as
        single-slot tokens, sent back in the same order and combined with the routing weights; a rank may send
        or receive nothing. The per-expert counts exchanged first tell each rank which expert every received
        row is for. Pairs dropped for capacity (expert id E) sort last and are neither sent nor computed."""
        # N tokens, K slots, D dim, L local experts, R ranks in the group, S pairs sent
        n_local, n_ranks, top_k = self.w1.shape[0], self.group.size(), expert_ids.shape[1]
        flat = expert_ids.flatten()
        order = flat.argsort(stable=True)
        send_counts = count_ids(flat, n_local * n_ranks + 1)[:-1]  # [E] pairs for each expert, less those dropped
        recv_counts = _exchange_counts(send_counts, self.group)  # [R, L]
        # the one read of the step: the exchange's split sizes, which a dropless all-to-all needs on the host
        send, recv = torch.stack([send_counts.view(n_ranks, n_local).sum(1), recv_counts.sum(1)]).tolist()
        order = order[:sum(send)]  # [S] the dropped pairs, sorted last, left out
        rows = x[order // top_k]  # [S, D] grouped by destination rank
        received = exchange(rows, recv, send, self.group)
        local_ids = torch.arange(n_local, device=flat.device).repeat(n_ranks).repeat_interleave(
            recv_counts.flatten(), output_size=sum(recv))
        ones = weights.new_ones(len(local_ids), 1)
        computed = self.compute(received, local_ids[:, None], ones, self.w1, self.w2, self.w3)
        # an empty sum that keeps the received rows and every local weight in the graph: a rank that got nothing
        # still runs the backward exchange (the ranks' collectives must match) and gets zero weight gradients
        anchor = sum(t.flatten()[:0].sum() for t in (received, self.w1, self.w2, self.w3))
        computed = computed + anchor
        returned = exchange(computed, send, recv, self.group)
        pair_weights = weights.flatten()[order, None].to(returned.dtype)
        return torch.zeros_like(x).index_add(0, order // top_k, returned * pair_weights)


class ExpertParallel(ParallelStyle):
    """A layer's experts sharded over the mesh's ep dimension, in place: rank r runs experts [r*E/ep, (r+1)*E/ep),
    and the layer's tokens travel to them and back (ExpertParallelExperts)."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        group = device_mesh.get_group()
        if module.w1.shape[0] % group.size():
            raise ConfigError(f"parallel.ep={group.size()} must divide model.n_experts={module.w1.shape[0]}")
        module.__class__, module.group = ExpertParallelExperts, group
        return module
