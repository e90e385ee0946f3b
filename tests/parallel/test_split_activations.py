"""Activations split over tp: with the vocabulary split, inside sharded_logits each rank holds only its columns of
the logits, and their cross-entropy is the whole model's; with sequence parallelism, in training, each rank's
residual stream holds its block of positions, and the logits are the whole model's (the trainer's gradients
under both are proven in test_gradients.py)."""

import datetime
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_materialize import materialized  # tests/parallel is on the path

from moe_diff.config import ConfigError, ModelConfig, ParallelConfig
from moe_diff.model import MoEDiffTransformer
from moe_diff.parallel.dims import ParallelDims
from moe_diff.parallel.runtime import Runtime
from moe_diff.parallel.tensor_parallel import check_tensor_parallel, sharded_logits

CONFIG = ModelConfig(vocab_size=48, dim=16, n_layers=1, n_heads=4, n_kv_heads=4, ffn_dim=24, n_experts=4,
                     max_seq_len=16, attention="diff", moe_backend="reference")


def check_rank(rank: int, world: int, init_file: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    dims = ParallelDims.from_config(ParallelConfig(tp=2, vocab_parallel=True, sequence_parallel=True), world)
    mesh = dims.build_mesh("cpu")
    check_vocabulary_split(rank, materialized(Runtime(dims, rank, 0, mesh, vocab_parallel=True), CONFIG))
    check_sequence_split(rank, materialized(Runtime(dims, rank, 0, mesh, sequence_parallel=True), CONFIG))
    dist.destroy_process_group()


def check_vocabulary_split(rank: int, model: MoEDiffTransformer) -> None:
    whole = materialized(Runtime(ParallelDims(1, 1, 1, 1)), CONFIG)
    tokens = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    expected = whole(inputs).logits
    with sharded_logits(model) as loss:
        logits = model(inputs).logits
    assert logits.shape == (2, 8, 24)  # this rank's half of the vocabulary
    torch.testing.assert_close(logits, expected[..., 24 * rank:24 * (rank + 1)], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss(logits, targets), F.cross_entropy(expected.flatten(0, 1), targets.flatten()),
                               rtol=1e-6, atol=1e-6)
    assert model(inputs).logits.shape == (2, 8, 48)  # gathered whole outside


def check_sequence_split(rank: int, model: MoEDiffTransformer) -> None:
    whole = materialized(Runtime(ParallelDims(1, 1, 1, 1)), CONFIG)
    tokens = torch.randint(0, 48, (2, 8), generator=torch.Generator().manual_seed(1))
    seen = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    torch.testing.assert_close(model(tokens).logits, whole(tokens).logits, rtol=1e-5, atol=1e-6)
    assert seen == [(2, 4, 16), (2, 4, 16)]  # the residual stream: this rank's 4 of the 8 positions
    model.eval()  # generation and validation: every position on every rank
    torch.testing.assert_close(model(tokens).logits, whole(tokens).logits, rtol=1e-5, atol=1e-6)
    assert seen[2:] == [(2, 8, 16), (2, 8, 16)]


def test_split_logits_and_positions_give_the_whole_models_results(tmp_path: Path) -> None:
    mp.spawn(check_rank, args=(2, str(tmp_path / "rendezvous")), nprocs=2)


def test_shapes_that_do_not_split_are_refused_before_any_module_changes() -> None:
    model = MoEDiffTransformer(replace(CONFIG, vocab_size=49))
    check_tensor_parallel(model, 2, vocab_parallel=False)
    with pytest.raises(ConfigError, match="parallel.vocab_parallel=true needs parallel.tp=2 to divide "
                                          "model.vocab_size=49"):
        check_tensor_parallel(model, 2, vocab_parallel=True)
    with pytest.raises(ConfigError, match="parallel.tp=3 must split model.n_heads=4"):
        check_tensor_parallel(model, 3, vocab_parallel=False)
