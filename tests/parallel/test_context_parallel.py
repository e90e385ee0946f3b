"""Context parallelism's attention over gloo: each rank's positions of a sequence, with the earlier keys they may
see received from their owners, give the whole sequence's outputs at those positions and, through the exchange's
backward, every input's gradient there (2 and 4 ranks; every mode; windows shorter and longer than a rank's
block and none; packed documents); a window's exchange moves the same bytes at any length."""

import datetime
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.multiprocessing as mp
from helpers import scattered_documents  # tests/ is on the path

from moe_diff.config import Config, ConfigError, ParallelConfig, TrainConfig
from moe_diff.kernels import attention_op
from moe_diff.kernels.mask import AttentionMask
from moe_diff.parallel.context_parallel import ContextParallelAttention, KeyExchange, SequenceLayout, context_shares
from moe_diff.parallel.dims import ParallelDims

T = 16
# windows of at most a chunk (T / 2cp: blocks, the keys before each from one rank) and longer (chunks r and 2cp-1-r,
# the keys before each from several), and none
CASES = [(window, packed) for window in (None, 2, 3, 11) for packed in (None, "runs", "scattered")]
INTERPRETED_CASES = [(None, "scattered"), (2, "runs"), (11, None)]  # Triton's interpreter: each regime once


def split(backend: str, mode: str, layout: SequenceLayout) -> ContextParallelAttention:
    """The attention as the ContextParallel style makes it, inside split_sequences for `layout`."""
    attend = ContextParallelAttention(attention_op(backend, mode), dist.group.WORLD)
    attend.layout = layout
    return attend


def inputs(mode: str, length: int = T) -> list[torch.Tensor]:
    """Float64 q, k, v (and lambda) of a whole sequence, the same on every rank: 2 query heads per kv head."""
    generator = torch.Generator().manual_seed(len(mode))
    if mode == "diff":
        shapes = [(2, length, 2, 2, 4), (2, length, 1, 2, 4), (2, length, 1, 8)]
    elif mode == "diff_v2":
        shapes = [(2, length, 4, 4), (2, length, 1, 4), (2, length, 1, 4), (2, length, 2)]
    else:
        shapes = [(2, length, 2, 4), (2, length, 1, 4), (2, length, 1, 4)]
    tensors = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in shapes]
    return tensors + [torch.tensor(0.3, dtype=torch.float64)] if mode == "diff" else tensors


def documents(packed: str | None) -> torch.Tensor | None:
    if packed == "runs":
        return torch.tensor([[0] * 5 + [1] * 6 + [2] * 5, [0] * 15 + [1]])
    return scattered_documents(T, 11) if packed == "scattered" else None


def check_rank(rank: int, world: int, init_file: str, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    for mode in ("standard", "diff", "diff_v2"):
        for window, packed in INTERPRETED_CASES if backend == "triton" else CASES:
            check_case(rank, world, mode, backend, window, documents(packed))
    if backend == "reference":  # the exchange is the backends' own
        check_bytes(rank, world)
    dist.destroy_process_group()


def check_case(rank: int, world: int, mode: str, backend: str, window: int | None,
               document_ids: torch.Tensor | None) -> None:
    layout = SequenceLayout(world, T, window)
    whole = [t.requires_grad_() for t in inputs(mode)]
    out = attention_op("reference", mode)(*whole, AttentionMask(window, document_ids))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    out.backward(grad)

    per_position = [t.dim() > 1 for t in whole]  # diff's lambda is one number
    dtype, tolerance = (torch.float32, 2e-5) if backend == "triton" else (torch.float64, 1e-10)
    mine = [(layout.own_positions(t, rank) if spread else t).detach().to(dtype).requires_grad_()
            for t, spread in zip(whole, per_position, strict=True)]
    attend = split(backend, mode, layout)
    own_documents = None if document_ids is None else layout.own_positions(document_ids, rank)
    got = attend(*mine, AttentionMask(window, own_documents))
    label = f"{mode} {backend} window {window} documents {document_ids is not None} rank {rank}"
    torch.testing.assert_close(got.double(), layout.own_positions(out, rank), rtol=tolerance, atol=tolerance,
                               msg=label)
    got.backward(layout.own_positions(grad, rank).to(dtype))
    for index, (part, full, spread) in enumerate(zip(mine, whole, per_position, strict=True)):
        expected = layout.own_positions(full.grad, rank) if spread else full.grad
        received = part.grad.double()
        if not spread:  # each rank's queries give their part of lambda's gradient
            dist.all_reduce(received)
        torch.testing.assert_close(received, expected, rtol=tolerance, atol=tolerance, msg=f"{label} input {index}")


def check_bytes(rank: int, world: int) -> None:
    """The bytes this rank sends in one layer's exchange, counted at torch's all-to-all itself, at two sequence
    lengths: the same with a window (its W - 1 keys and values), twice as many at twice the length without one."""
    per_length = {}
    with mock.patch.object(funcol, "all_to_all_single_autograd", wraps=funcol.all_to_all_single_autograd) as sent:
        for window in (3, None):
            for length in (4 * T, 8 * T):
                layout = SequenceLayout(world, length, window)
                q, k, v = (layout.own_positions(t, rank) for t in inputs("standard", length))
                sent.reset_mock()
                split("reference", "standard", layout)(q, k, v, AttentionMask(window))
                per_length[window, length] = sum(call.args[0].numel() * call.args[0].element_size()
                                                 for call in sent.call_args_list)
    sends_halo = rank < world - 1  # the last rank's positions precede no one's
    assert per_length[3, 4 * T] == per_length[3, 8 * T] == 2 * 2 * (3 - 1) * 4 * 8 * sends_halo, per_length
    total = torch.tensor([per_length[None, 4 * T], per_length[None, 8 * T]])
    dist.all_reduce(total)
    assert total[1] == 2 * total[0] > 0, total
    for (window, length), sent_here in per_length.items():  # what `moe-diff info` reports: all ranks together
        total = torch.tensor(sent_here)
        dist.all_reduce(total)
        received = sum(share.received for share in context_shares(world, length, window))
        assert total == received * 2 * 2 * 4 * 8, (window, length)  # batch 2, k and v of width 4, float64


@pytest.mark.parametrize(("world", "backend"), [(2, "reference"), (4, "reference"), (2, "sdpa"), (2, "triton")])
# the exchange is the same for every backend: 4 ranks (keys from several) on the reference; the interpreter is slow
def test_each_ranks_positions_equal_the_whole_sequences(world: int, backend: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton's kernels in float32 under its interpreter (TRITON_INTERPRET=1, as its kernel tests set it)."""
    if backend == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # read when the spawned ranks import the kernels
    mp.spawn(check_rank, args=(world, str(tmp_path / "rendezvous"), backend), nprocs=world)


CHUNKS = [[(0, 2), (14, 16)], [(2, 4), (12, 14)], [(4, 6), (10, 12)], [(6, 8), (8, 10)]]


@pytest.mark.parametrize(("window", "spans", "received"), [
    (None, CHUNKS, [12, 10, 8, 6]), (2, [[(0, 4)], [(4, 8)], [(8, 12)], [(12, 16)]], [0, 1, 1, 1]),
    (7, CHUNKS, [6, 8, 8, 6])])
def test_layouts_balance_causal_work_and_receive_only_the_window(window: int | None, spans: list, received: list
                                                                 ) -> None:
    """Without a window, or with one longer than a chunk, rank r holds chunks r and 2cp-1-r and receives every
    earlier position it lacks, or the W - 1 before each chunk (never the positions between them it does not need);
    with a window of at most a chunk, a block and the W - 1 positions before it."""
    layout = SequenceLayout(4, T, window)
    assert [layout.spans(rank) for rank in range(4)] == spans
    assert [sum(KeyExchange(layout, rank).recv_sizes) for rank in range(4)] == received
    assert all(sum(KeyExchange(layout, rank).send_sizes) == sum(KeyExchange(layout, other).recv_sizes[rank]
                                                                for other in range(4)) for rank in range(4))


def test_a_length_that_does_not_split_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"train.seq_len=20 must split into 2 x parallel.cp chunks .* multiple of 8"):
        SequenceLayout(4, 20, None)
    with pytest.raises(ConfigError, match="train.seq_len=18 must split into parallel.cp blocks: a multiple of 4"):
        SequenceLayout(4, 18, 2)  # a window of at most a chunk: blocks


def test_layouts_with_cp_are_checked_against_the_world_size() -> None:
    with pytest.raises(ConfigError, match="parallel.cp=0 is not allowed: a positive integer"):
        ParallelConfig(cp=0)
    with pytest.raises(ConfigError, match=r"parallel.cp=3 x parallel.tp=1 must divide the world size 4"):
        ParallelDims.from_config(ParallelConfig(cp=3), 4)
    with pytest.raises(ConfigError, match=r"parallel.ep=2 x parallel.cp=2 x parallel.tp=2 must divide the world "
                                          "size 4"):
        ParallelDims.from_config(ParallelConfig(cp=2, tp=2, ep=2), 4)
    dims = ParallelDims.from_config(ParallelConfig(cp=2, ep=2), 8)
    assert (dims.dp, dims.cp, dims.dp_shard) == (4, 2, 2)
    with pytest.raises(ConfigError, match=r"train.seq_len=36 is not allowed: a multiple of parallel.tp=2 x "
                                          "parallel.cp=4 with parallel.sequence_parallel=true"):
        Config(parallel=ParallelConfig(tp=2, cp=4, sequence_parallel=True), train=TrainConfig(seq_len=36))


def test_a_sequence_the_layout_did_not_split_is_refused() -> None:
    class RankZero:
        def rank(self) -> int:
            return 0

        def size(self) -> int:
            return 2

    attend = ContextParallelAttention(attention_op("reference", "standard"), RankZero())
    attend.layout = SequenceLayout(2, T, None)
    q, k, v = inputs("standard")  # the whole sequence, not rank 0's half of it
    with pytest.raises(ValueError, match=f"split sequences of {T} positions with window None into {T // 2} on this "
                                         f"rank; the attention got {T} with window None"):
        attend(q, k, v, AttentionMask(None))
    attend.layout = None  # outside split_sequences (sampling, traces): the sequence as it is given
    with torch.no_grad():
        torch.testing.assert_close(attend(q, k, v, AttentionMask(None)),
                                   attention_op("reference", "standard")(q, k, v, AttentionMask(None)))
    with pytest.raises(RuntimeError, match=r"trained inside split_sequences\(model, layout\)"):
        attend(q, k, v, AttentionMask(None))  # a training forward the trainer did not split
