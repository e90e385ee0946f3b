"""Expert parallelism over gloo: 2 and 4 processes equal one process in outputs and gradients."""

import copy
import datetime
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_diff.config import ModelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.expert_parallel import ExpertParallelExperts, parallelize_experts

CONFIG = dict(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=24, n_experts=4, top_k=2,
              max_seq_len=16, attention="diff")


def check_rank(rank: int, world: int, init_file: str, all_to_first_experts: bool) -> None:
    """One rank: its own tokens through the sharded model against the whole batch through the full model."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    full = MoEDiffTransformer(ModelConfig(**CONFIG))
    if all_to_first_experts:  # equal scores: every token picks experts 0 and 1, so the other ranks get nothing
        with torch.no_grad():
            for block in full.layers:
                block.moe.gate.weight.zero_()
    sharded = parallelize_experts(copy.deepcopy(full), dist.group.WORLD)
    tokens = torch.randint(0, 48, (world, 11), generator=torch.Generator().manual_seed(1))

    mine = sharded(tokens[rank:rank + 1]).logits
    mine.square().mean().backward()
    everyone = full(tokens).logits
    everyone.square().mean(dim=(1, 2)).sum().backward()  # the sum of every rank's loss

    torch.testing.assert_close(mine, everyone[rank:rank + 1], rtol=1e-5, atol=1e-6)
    per_rank = 4 // world
    for block, reference in zip(sharded.layers, full.layers, strict=True):
        assert isinstance(block.moe.experts, ExpertParallelExperts)
        for name in ("w1", "w2", "w3"):  # expert gradients arrive from every rank's tokens
            expected = getattr(reference.moe.experts, name).grad[rank * per_rank:(rank + 1) * per_rank]
            torch.testing.assert_close(getattr(block.moe.experts, name).grad, expected, rtol=1e-5, atol=1e-6)
    dense = {n: p for n, p in sharded.named_parameters() if ".experts." not in n}
    reference_grads = {n: p.grad for n, p in full.named_parameters()}
    for name, param in dense.items():  # the rest is data parallel: gradients sum over ranks
        grad = param.grad.clone()
        dist.all_reduce(grad)
        torch.testing.assert_close(grad, reference_grads[name], rtol=1e-5, atol=1e-6)
    dist.destroy_process_group()


@pytest.mark.parametrize(("world", "all_to_first_experts"), [(2, False), (4, False), (2, True)])
def test_expert_parallel_equals_one_process(world: int, all_to_first_experts: bool, tmp_path: Path) -> None:
    mp.spawn(check_rank, args=(world, str(tmp_path / "rendezvous"), all_to_first_experts), nprocs=world)


def test_ep_must_divide_the_experts() -> None:
    class Group:
        def size(self) -> int:
            return 3

    with pytest.raises(ValueError, match="parallel.ep=3 must divide model.n_experts=4"):
        parallelize_experts(MoEDiffTransformer(ModelConfig(**CONFIG)), Group())
