"""A model built on the meta device and parallelized (and fully sharded) there: each rank allocates only its pieces,
filled exactly as the single-process initialisation fills the whole model."""

import datetime
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_diff.config import ModelConfig, ParallelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.apply import materialize, parallelize, shard_fully
from moe_diff.parallel.dims import ParallelDims
from moe_diff.parallel.pieces import local_tensor
from moe_diff.parallel.runtime import Runtime

CONFIG = ModelConfig(vocab_size=48, dim=16, n_layers=2, n_heads=4, n_kv_heads=4, ffn_dim=24, n_experts=4,
                     max_seq_len=16, attention="diff", tie_embeddings=True, expert_bias_rate=0.01)

# Megatron's split of each parameter, written out here independently of the code under test
TENSOR_PARALLEL_DIMS = {"wq.weight": 0, "wk.weight": 0, "wv.weight": 0, "wo.weight": 1, "experts.w1": 1,
                        "experts.w3": 1, "experts.w2": 2, "tok_embeddings.weight": 0}


def materialized(job: Runtime, config: ModelConfig = CONFIG) -> MoEDiffTransformer:
    """The model of `config` as this rank of `job` holds it, built on the meta device and filled from seed 5."""
    with torch.device("meta"):
        model = parallelize(MoEDiffTransformer(config), job)
    materialize(model, job, torch.device("cpu"), seed=5)
    return model


def check_rank(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dims = ParallelDims.from_config(ParallelConfig(tp=2, ep=2, vocab_parallel=True), world)
    job = Runtime(dims, rank, 0, dims.build_mesh("cpu"), vocab_parallel=True)
    mine = materialized(job)
    whole = dict(materialized(Runtime(ParallelDims(1, 1, 1, 1))).named_parameters())
    tp, ep = job.mesh.get_local_rank("tp"), job.mesh.get_local_rank("ep")
    for name, param in mine.named_parameters():
        expected = whole[name]
        if ".experts." in name:
            expected = expected[2 * ep:2 * ep + 2]
        dim = next((dim for suffix, dim in TENSOR_PARALLEL_DIMS.items() if name.endswith(suffix)), None)
        if dim is not None:
            expected = expected.chunk(2, dim)[tp]
        assert param.shape == whole[name].shape, name  # a DTensor of the single-process shape
        torch.testing.assert_close(local_tensor(param), expected, rtol=0, atol=0, msg=name)
    tied = dict(mine.named_parameters(remove_duplicate=False))
    assert tied["output.weight"] is tied["tok_embeddings.weight"]
    assert all(torch.equal(block.moe.expert_bias, torch.zeros(4)) for block in mine.layers)
    held, total = sum(local_tensor(p).numel() for p in mine.parameters()), sum(p.numel() for p in whole.values())
    assert held < 0.4 * total  # the experts, attention and vocabulary all split 4 or 2 ways
    dist.destroy_process_group()


def check_fully_sharded_rank(rank: int, world: int, init_file: str) -> None:
    """FSDP over 2 replicas of tp=2 halves: each rank's FSDP piece is its part of the tp half, and the pieces of
    a parameter gathered over the job are the whole."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dims = ParallelDims.from_config(ParallelConfig(tp=2, data_parallel="fsdp"), world)
    job = Runtime(dims, rank, 0, dims.build_mesh("cpu"), data_parallel="fsdp")
    with torch.device("meta"):
        model = parallelize(MoEDiffTransformer(CONFIG), job)
    shard_fully(model, job)
    materialize(model, job, torch.device("cpu"), seed=5)
    whole = dict(materialized(Runtime(ParallelDims(1, 1, 1, 1))).named_parameters())
    tp = job.mesh.get_local_rank("tp")
    for name, param in model.named_parameters():
        dim = next((dim for suffix, dim in TENSOR_PARALLEL_DIMS.items()
                    if name.endswith(suffix) and suffix != "tok_embeddings.weight"), None)
        half = whole[name] if dim is None else whole[name].chunk(2, dim)[tp]
        assert param.to_local().shape[0] < half.shape[0] or half.shape[0] == 1, name  # a piece only
        torch.testing.assert_close(param.full_tensor(), whole[name], rtol=0, atol=0, msg=name)
    dist.destroy_process_group()


def test_each_rank_allocates_only_its_pieces_of_the_single_process_init(tmp_path: Path) -> None:
    mp.spawn(check_rank, args=(4, str(tmp_path / "rendezvous")), nprocs=4)


def test_fully_sharded_ranks_allocate_only_their_pieces(tmp_path: Path) -> None:
    mp.spawn(check_fully_sharded_rank, args=(4, str(tmp_path / "rendezvous")), nprocs=4)
