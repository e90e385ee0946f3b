"""Expert parallelism over gloo: 2 and 4 processes equal one process in outputs, gradients and training."""

import copy
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor.parallel import parallelize_module

from moe_diff.config import ConfigError, ModelConfig, ParallelConfig, load_config
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel import expert_parallel
from moe_diff.parallel.apply import parallelize
from moe_diff.parallel.dims import ParallelDims
from moe_diff.parallel.expert_parallel import ExpertParallelExperts
from moe_diff.parallel.pieces import local_tensor
from moe_diff.parallel.plan import module_plan
from moe_diff.parallel.runtime import Runtime

CONFIG = dict(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, n_experts=4, top_k=2,
              max_seq_len=16, attention="diff")


def check_rank(rank: int, world: int, init_file: str, all_to_first_experts: bool,
               capacity_factor: float | None) -> None:
    """One rank: its own tokens through the sharded model against the whole batch through the full model (with a
    capacity, which counts each rank's own tokens, against the full model on this rank's tokens, its gradients
    summed over the ranks); the rows this rank sends are its kept assignments, dropped ones stay behind."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    full = MoEDiffTransformer(ModelConfig(**CONFIG, capacity_factor=capacity_factor))
    if all_to_first_experts:  # equal scores: every token picks experts 0 and 1, so the other ranks get nothing
        with torch.no_grad():
            for block in full.layers:
                block.moe.gate.weight.zero_()
    dims = ParallelDims.from_config(ParallelConfig(ep=world), world)
    sharded = parallelize(copy.deepcopy(full), Runtime(dims, rank, 0, dims.build_mesh("cpu")))
    tokens = torch.randint(0, 48, (world, 11), generator=torch.Generator().manual_seed(1))
    sent: list[int] = []  # the rows this rank sends in each exchange
    exchange = expert_parallel.exchange

    def recording(rows: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup) -> torch.Tensor:
        sent.append(sum(send))
        return exchange(rows, recv, send, group)

    expert_parallel.exchange = recording
    out = sharded(tokens[rank:rank + 1])
    kept = [int(routing.counts.sum()) for routing in out.routings]
    # each layer's outgoing exchange (then the one returning what this rank computed) carries its kept assignments
    assert sent[::2] == kept, f"rows sent {sent[::2]}, assignments kept {kept}"
    assert capacity_factor is None or all(int(routing.dropped) > 0 for routing in out.routings)
    mine = out.logits
    mine.square().mean().backward()
    if capacity_factor is None:
        everyone = full(tokens).logits
        everyone.square().mean(dim=(1, 2)).sum().backward()  # the sum of every rank's loss
        theirs = everyone[rank:rank + 1]
    else:
        theirs = full(tokens[rank:rank + 1]).logits
        theirs.square().mean().backward()
        for param in full.parameters():
            dist.all_reduce(param.grad)

    torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    per_rank = 4 // world
    reference_grads = {n: p.grad for n, p in full.named_parameters()}
    for block in sharded.layers:
        assert isinstance(block.moe.experts, ExpertParallelExperts)
    for name, param in sharded.named_parameters():
        if ".experts." in name:  # expert gradients arrive from every rank's tokens
            expected = reference_grads[name][rank * per_rank:(rank + 1) * per_rank]
            torch.testing.assert_close(local_tensor(param.grad), expected, rtol=1e-5, atol=1e-6)
            continue
        grad = param.grad.clone()  # the rest is data parallel: gradients sum over ranks
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "all_to_first_experts", "capacity_factor"),
                         [(2, False, None), (4, False, None), (2, True, None), (2, False, 0.5)])
def test_expert_parallel_equals_one_process(world: int, all_to_first_experts: bool, capacity_factor: float | None,
                                            tmp_path: Path) -> None:
    mp.spawn(check_rank, args=(world, str(tmp_path / "rendezvous"), all_to_first_experts, capacity_factor),
             nprocs=world)


def test_ep_must_divide_the_experts() -> None:
    class Mesh:  # of three ranks, and its group
        def get_group(self) -> "Mesh":
            return self

        def size(self) -> int:
            return 3

    model = MoEDiffTransformer(ModelConfig(**CONFIG))
    with pytest.raises(ValueError, match="parallel.ep=3 must divide model.n_experts=4"):
        parallelize_module(model, Mesh(), module_plan(3, 1, 1, False, False)["ep"])


def test_layouts_are_checked_against_the_world_size() -> None:
    with pytest.raises(ConfigError, match=r"parallel.dp=3 x parallel.tp=1 must equal the world size 4"):
        ParallelDims.from_config(ParallelConfig(dp=3), 4)
    with pytest.raises(ConfigError, match="parallel.ep=3 must divide the world size 4"):
        ParallelDims.from_config(ParallelConfig(ep=3), 4)
    assert ParallelDims.from_config(ParallelConfig(ep=2), 4) == ParallelDims(4, 1, 2, 4)
    with pytest.raises(ConfigError, match="parallel.ep=2 x parallel.tp=2 must divide the world size 2"):
        ParallelDims.from_config(ParallelConfig(ep=2, tp=2), 2)
    assert ParallelDims.from_config(ParallelConfig(ep=2, tp=2), 4) == ParallelDims(2, 2, 2, 4)
    hsdp = ParallelDims.from_config(ParallelConfig(data_parallel="fsdp", dp_replicate=2, ep=2), 8)
    assert (hsdp.dp_replicate, hsdp.dp_shard) == (2, 2)
    with pytest.raises(ConfigError, match="parallel.dp_replicate=3 must divide the 4 ranks holding the same expert"):
        ParallelDims.from_config(ParallelConfig(data_parallel="fsdp", dp_replicate=3), 4)
    with pytest.raises(ConfigError, match="parallel.dp_replicate=2 leaves each HSDP group one rank"):
        ParallelDims.from_config(ParallelConfig(data_parallel="fsdp", dp_replicate=2), 2)
    with pytest.raises(ConfigError, match=r"parallel.dp_replicate=2 is not allowed: .*only with "
                                          r"parallel.data_parallel=fsdp"):
        ParallelConfig(data_parallel="ddp", dp_replicate=2)
    with pytest.raises(ConfigError, match=r"parallel.data_parallel='allreduce' is not allowed: one of ddp, fsdp "
                                          r"\(allreduce, .* was slower than ddp in every layout measured"):
        ParallelConfig(data_parallel="allreduce")
    with pytest.raises(ConfigError, match=r"parallel.sequence_parallel=True is not allowed: .*only with "
                                          r"parallel.tp > 1"):
        ParallelConfig(sequence_parallel=True)
    with pytest.raises(ConfigError, match=r"train.seq_len=33 is not allowed: a multiple of parallel.tp=2 with "
                                          r"parallel.sequence_parallel=true"):
        load_config(None, ["parallel.tp=2", "parallel.sequence_parallel=true", "train.seq_len=33"])
