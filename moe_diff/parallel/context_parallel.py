"""Context parallelism: every sequence of a batch split along its length over the cp ranks, so that no rank holds
a whole sequence's activations. Everything but attention runs on the rank's own positions (with the rotary
positions and document ids of the whole sequence); attention receives, once per layer, the keys and values of the
earlier positions its queries may see and runs the backend on its queries against them (the rule's queries are
the last of its keys: mask.py), sending their gradients back to their owners in the backward.

Which positions a rank holds (SequenceLayout): with a window of at most a chunk (T / 2cp), one block, so that it
receives only the W - 1 positions before it, from the rank before: O(W) per layer whatever the length; without a
window, or with a longer one, causal attention's work grows with the position, so rank r holds chunks r and
2cp-1-r of 2cp equal chunks (torch's and torchtitan's load balancing) and receives, for each chunk, the earlier
positions it may see and does not hold: the W - 1 before it, or every one (O(T)). The exchange is one all-to-all
per layer (keys and values together; the document ids once per forward) whose split sizes follow from the layout
alone (no host read).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

from moe_diff import costs
from moe_diff.config import ConfigError
from moe_diff.kernels.mask import AttentionMask, window_spans
from moe_diff.parallel.collectives import exchange

Span = tuple[int, int]  # positions [start, stop) of the whole sequence


@dataclass(frozen=True)
class SequenceLayout:
    """Which positions of a `seq_len`-long sequence each of `n_ranks` ranks holds, for attention with `window`."""

    n_ranks: int
    seq_len: int
    window: int | None

    def __post_init__(self) -> None:
        parts = 2 * self.n_ranks if self.chunked else self.n_ranks
        if self.seq_len % parts:
            layout = "2 x parallel.cp chunks (causal load balancing)" if self.chunked else "parallel.cp blocks"
            raise ConfigError(f"train.seq_len={self.seq_len} must split into {layout}: a multiple of {parts}")

    @property
    def chunked(self) -> bool:
        """Whether each rank holds two chunks (no window, or one longer than a chunk, T / 2cp) rather than one block
        (whose first rank's work is then at least 3/4 of the others')."""
        return self.window is None or self.window > self.seq_len // (2 * self.n_ranks)

    def spans(self, rank: int) -> list[Span]:
        """The positions `rank` holds, in the order its tensors hold them."""
        if not self.chunked:
            size = self.seq_len // self.n_ranks
            return [(rank * size, (rank + 1) * size)]
        size = self.seq_len // (2 * self.n_ranks)
        last = 2 * self.n_ranks - 1 - rank
        return [(rank * size, (rank + 1) * size), (last * size, (last + 1) * size)]

    def first_key(self, position: int) -> int:
        """The earliest position the query at `position` may see."""
        return 0 if self.window is None else max(0, position - self.window + 1)

    def keys(self, rank: int) -> list[Span]:
        """The positions whose keys `rank`'s queries may see: each span's, from its earliest key to its end, merged
        where they meet, in position order."""
        merged: list[Span] = []
        for start, stop in sorted((self.first_key(start), stop) for start, stop in self.spans(rank)):
            if merged and start <= merged[-1][1]:
                merged[-1] = (merged[-1][0], max(merged[-1][1], stop))
            else:
                merged.append((start, stop))
        return merged

    def owners(self, spans: list[Span]) -> list[tuple[int, int, int]]:
        """`spans` cut at the ranks' spans: (start, stop, the rank holding them), in position order."""
        held = sorted((start, stop, rank) for rank in range(self.n_ranks) for start, stop in self.spans(rank))
        return [(max(start, first), min(stop, last), rank) for first, last in spans for start, stop, rank in held
                if start < last and stop > first]

    def own_positions(self, x: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
        """`rank`'s positions of a whole-sequence tensor (tokens, targets, positions, document ids), as it holds
        them."""
        return torch.cat([x.narrow(dim, start, stop - start) for start, stop in self.spans(rank)], dim)


class KeyExchange:
    """One rank's part of the exchange that gives every rank the keys its queries may see: what it sends to each
    rank, what it receives from each, and how it lays them out in position order with its own."""

    def __init__(self, layout: SequenceLayout, rank: int):
        self.layout, self.rank = layout, rank
        self.key_spans = layout.keys(rank)
        self._held, index = [], 0  # (start, stop, where the span begins in this rank's tensors)
        for start, stop in layout.spans(rank):
            self._held.append((start, stop, index))
            index += stop - start
        self.n_queries = index  # the positions this rank holds
        # every rank's keys as (start, stop, owner) in position order; this rank's are the pieces it assembles
        wanted = [layout.owners(layout.keys(other)) for other in range(layout.n_ranks)]
        self.pieces = wanted[rank]
        self.sends = [[(start, stop) for start, stop, owner in pieces if owner == rank] if other != rank else []
                      for other, pieces in enumerate(wanted)]
        # whether any rank receives anything (the same answer on every rank): a window of 1 moves nothing
        self.moves = any(owner != other for other, pieces in enumerate(wanted) for _, _, owner in pieces)
        self.send_sizes = [sum(stop - start for start, stop in spans) for spans in self.sends]
        self.recv_sizes = [sum(stop - start for start, stop, owner in self.pieces if owner == other)
                           if other != rank else 0 for other in range(layout.n_ranks)]
        self.query_blocks = self._query_blocks()

    def _local(self, start: int, stop: int) -> slice:
        """Where positions [start, stop), which this rank holds, lie in its tensors."""
        for first, last, index in self._held:
            if first <= start and stop <= last:
                return slice(index + start - first, index + stop - first)
        raise ValueError(f"rank {self.rank} does not hold positions [{start}, {stop})")

    def gather(self, tensors: list[torch.Tensor], group: dist.ProcessGroup) -> list[torch.Tensor]:
        """Each x [B, T/cp, ...] (this rank's positions) -> [B, K, ...]: the positions of key_spans in order, the
        others' received; differentiable (their gradients go back to their owners). One exchange carries them all,
        so every rank runs the same collectives in the backward too."""
        widths = [t[0, 0].numel() for t in tensors]
        rows = torch.cat([t.transpose(0, 1).reshape(*t.shape[1::-1], -1) for t in tensors], dim=2)  # [T/cp, B, F]
        outgoing = [rows[self._local(start, stop)] for spans in self.sends for start, stop in spans]
        send = torch.cat(outgoing) if outgoing else rows[:0]
        received = exchange(send.contiguous(), self.recv_sizes, self.send_sizes, group) if self.moves else send
        from_rank = dict(zip(range(self.layout.n_ranks), received.split(self.recv_sizes), strict=True))
        taken = dict.fromkeys(from_rank, 0)
        parts = [received[:0]]  # in the graph even where nothing arrives, so that the backward exchange runs here
        for start, stop, owner in self.pieces:
            if owner == self.rank:
                parts.append(rows[self._local(start, stop)])
            else:
                parts.append(from_rank[owner][taken[owner]:taken[owner] + stop - start])
                taken[owner] += stop - start
        keys = torch.cat(parts).transpose(0, 1)  # [B, K, sum of widths]
        return [part.view(*part.shape[:2], *t.shape[2:])
                for part, t in zip(keys.split(widths, dim=2), tensors, strict=True)]

    def _query_blocks(self) -> list[tuple[slice, slice]]:
        """For each span this rank holds: its queries in this rank's tensors, and the keys they may see in
        gather()'s output (the queries the last of them)."""
        blocks = []
        for start, stop in self.layout.spans(self.rank):
            index = 0  # where the key span holding this span's keys begins in gather()'s output
            for first, last in self.key_spans:
                if first <= start < last:
                    blocks.append((self._local(start, stop), slice(index + self.layout.first_key(start) - first,
                                                                   index + stop - first)))
                index += last - first
        return blocks


@dataclass(frozen=True)
class ContextShare:
    """One rank's part of one layer's attention over a training sequence split by context parallelism."""

    queries: int  # positions it holds
    keys: int  # positions whose keys and values it attends to, its own included
    received: int  # of those, the positions other ranks send it in the forward (it sends their gradients back)
    pairs: int  # (query, key) pairs it scores: its work
    blocks: int  # elements of the [queries, keys] blocks CPU SDPA scores: its score maps and boolean mask


def context_shares(n_ranks: int, seq_len: int, window: int | None) -> list[ContextShare]:
    """Every rank's share of one layer's attention over a sequence of `seq_len` split over `n_ranks` ranks (one
    rank: the whole sequence)."""
    if n_ranks == 1:
        return [ContextShare(seq_len, seq_len, 0, costs.causal_pairs(seq_len, window),
                             scored(seq_len, seq_len, window))]
    layout = SequenceLayout(n_ranks, seq_len, window)
    shares = []
    for rank in range(n_ranks):
        plan = KeyExchange(layout, rank)
        spans = layout.spans(rank)
        shares.append(ContextShare(
            queries=plan.n_queries,
            keys=sum(stop - start for start, stop in plan.key_spans),
            received=sum(plan.recv_sizes),
            pairs=sum(costs.causal_pairs(stop, window) - costs.causal_pairs(start, window) for start, stop in spans),
            blocks=sum(scored(q.stop - q.start, seen.stop - seen.start, window) for q, seen in plan.query_blocks)))
    return shares


def scored(n_queries: int, n_keys: int, window: int | None) -> int:
    """(query, key) elements CPU SDPA scores for queries that are the last of the keys: every pair, or a short
    window's blocks (mask.window_spans)."""
    spans = window_spans(n_queries, n_keys, window)
    if spans is None:
        return n_queries * n_keys
    return sum((queries.stop - queries.start) * (keys.stop - keys.start) for queries, keys in spans)


@functools.cache
def key_exchange(layout: SequenceLayout, rank: int) -> KeyExchange:
    """`rank`'s exchange for sequences laid out by `layout`, planned once."""
    return KeyExchange(layout, rank)


class ContextParallelAttention:
    """A layer's attention function on this rank's positions of every sequence while split_sequences gives it their
    layout: the keys and values its queries may see gathered (KeyExchange), then the backend on each of its spans'
    queries. Otherwise (sampling, routing traces, a KV cache: without gradients) the backend on the sequence as it
    is given."""

    def __init__(self, attend: Callable, group: dist.ProcessGroup):
        self.attend, self.group = attend, group
        self.layout: SequenceLayout | None = None

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        *lam, mask = rest  # diff: a 0-dim lambda; diff_v2: one per query [B, T, H]; standard: none
        if mask.explicit is not None:
            return self.attend(q, k, v, *rest)
        if self.layout is None:
            if torch.is_grad_enabled() and self.group.size() > 1:  # a rank's positions taken for whole sequences
                raise RuntimeError("a model with context parallelism is trained inside split_sequences(model, "
                                   "layout), which tells its attention how the sequences were split")
            return self.attend(q, k, v, *rest)
        plan = key_exchange(self.layout, self.group.rank())
        if q.shape[1] != plan.n_queries or mask.window != self.layout.window:
            raise ValueError(f"context parallelism split sequences of {self.layout.seq_len} positions with window "
                             f"{self.layout.window} into {plan.n_queries} on this rank; the attention got "
                             f"{q.shape[1]} with window {mask.window}")
        keys, values = plan.gather([k, v], self.group)
        masks = mask.form(("context parallel", q.shape[1]), lambda: self._span_masks(plan, mask))
        outputs = [self.attend(q[:, queries], keys[:, seen], values[:, seen],
                               *(each[:, queries] if each.dim() else each for each in lam), span_mask)
                   for (queries, seen), span_mask in zip(plan.query_blocks, masks, strict=True)]
        return torch.cat(outputs, dim=1) if len(outputs) > 1 else outputs[0]

    def _span_masks(self, plan: KeyExchange, mask: AttentionMask) -> list[AttentionMask]:
        """Each span's rule over the keys it may see (their document ids received like the keys), built once per
        forward and shared by every layer."""
        documents = plan.gather([mask.document_ids], self.group)[0] if mask.document_ids is not None else None
        return [AttentionMask(mask.window, None if documents is None else documents[:, seen])
                for _, seen in plan.query_blocks]


class ContextParallel(ParallelStyle):
    """Attention over the mesh's cp dimension: the layer's attention function becomes a ContextParallelAttention."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module.attend = ContextParallelAttention(module.attend, device_mesh.get_group())
        return module


@contextlib.contextmanager
def split_sequences(model: nn.Module, layout: SequenceLayout | None) -> Iterator[None]:
    """Within it, every ContextParallelAttention of `model` reads its inputs as this rank's positions of sequences
    split by `layout` (the trainer's own, so the two never disagree): hold it over the backward too, where
    activation checkpointing runs the forward again. Nothing changes with None (no cp)."""
    attentions = [module.attend for module in model.modules()
                  if isinstance(getattr(module, "attend", None), ContextParallelAttention)]
    for attention in attentions:
        attention.layout = layout
    try:
        yield
    finally:
        for attention in attentions:
            attention.layout = None
