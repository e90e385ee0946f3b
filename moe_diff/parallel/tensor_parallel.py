"""Tensor parallelism (Megatron style) applied to a finished model: wq, wk, wv (and diff_v2's lambda_proj) split
by output rows so every rank keeps whole differential heads and kv groups, wo split by input columns, and
every expert's FFN split along ffn_dim. Activations entering a split region are copied (their gradient is summed
over the group); the outputs of wo and of the experts are summed over the group (with parallel.sequence_parallel,
in training, gathered by positions on the way in and reduce-scattered on the way out: _Regions). The model's
reshapes use -1 heads, so it runs on its local heads unchanged. Optionally (parallel.vocab_parallel) the
embedding and output head split the vocabulary: each rank looks up its rows (the group sums the lookups) and
computes its columns of the logits, which the training loss takes as they are (sharded_logits: no rank holds the
whole logits) and everything else gathers whole.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_diff.config import ConfigError
from moe_diff.kernels.precision import compute_dtype
from moe_diff.model import MoEDiffTransformer


class _CopyToGroup(torch.autograd.Function):
    """Identity forward; the gradient is summed over the group (each rank saw only its part of the use)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """The partial results of the group summed forward; the gradient passes unchanged to each part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


class _GatherFromGroup(torch.autograd.Function):
    """The group's parts concatenated along the last dimension; the gradient's own part goes back to each."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(group.size())]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.chunk(ctx.group.size(), dim=-1)[ctx.group.rank()].contiguous(), None


def _gather_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T/tp, ...] on each rank -> [B, T, ...], rank r's positions the r-th block."""
    gathered = x.new_empty((group.size() * x.shape[1], x.shape[0], *x.shape[2:]))
    dist.all_gather_into_tensor(gathered, x.transpose(0, 1).contiguous(), group=group)
    return gathered.transpose(0, 1)


def _sum_own_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T, ...] on each rank -> the group's sum of this rank's block of positions, [B, T/tp, ...]."""
    mine = x.new_empty((x.shape[1] // group.size(), x.shape[0], *x.shape[2:]))
    dist.reduce_scatter_tensor(mine, x.transpose(0, 1).contiguous(), group=group)
    return mine.transpose(0, 1)


def own_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """This rank's block of positions (dimension 1) of a whole sequence."""
    size = x.shape[1] // group.size()
    return x.narrow(1, group.rank() * size, size)


class _GatherSequence(torch.autograd.Function):
    """Sequence parallelism into a region that needs every position: the ranks' blocks gathered; the gradient's
    own block goes back, summed over the group first where each rank's use is partial (its heads, its FFN
    columns), taken as it is where every rank computed the same (the router, the output head)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup, partial: bool) -> torch.Tensor:
        ctx.group, ctx.partial = group, partial
        return _gather_positions(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        mine = _sum_own_positions(grad, ctx.group) if ctx.partial else own_positions(grad, ctx.group).contiguous()
        return mine, None, None


class _ScatterSequence(torch.autograd.Function):
    """Out of a region every rank computed whole (the embedding): this rank's block of positions; the gradient
    of the whole gathered from every rank's block."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return own_positions(x, group).contiguous()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_positions(grad, ctx.group), None


class _ReduceScatterSequence(torch.autograd.Function):
    """Out of a region whose ranks computed partial sums (wo, the experts): the group's sum of this rank's block
    of positions; the gradient of the whole gathered, for each rank's part."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return _sum_own_positions(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _gather_positions(grad, ctx.group), None


class VocabParallelEmbedding(nn.Module):
    """The embedding (the same parameter), of which this rank holds a block of rows once it is laid out; a token
    outside them looks up zeros and the group's lookups are summed."""

    def __init__(self, embedding: nn.Embedding, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.group = embedding.weight, group
        self.first_row = group.rank() * (embedding.weight.shape[0] // group.size())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens - self.first_row
        outside = (rows < 0) | (rows >= self.weight.shape[0])
        looked_up = F.embedding(rows.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return _SumOverGroup.apply(looked_up, self.group)


class VocabParallelHead(nn.Module):
    """The output head (the same parameter), of which this rank holds a block of rows once it is laid out: its
    columns of the logits, gathered whole but inside sharded_logits()."""

    def __init__(self, weight: nn.Parameter, group: dist.ProcessGroup):
        super().__init__()
        self.weight, self.group, self.gather = weight, group, True
        self.first_column = group.rank() * (weight.shape[0] // group.size())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(_CopyToGroup.apply(h, self.group), self.weight)
        return _GatherFromGroup.apply(logits, self.group) if self.gather else logits


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits split by columns over the group (Megatron's): the row maxima and the sums of
    exponentials reduced over it, each target's logit taken from the rank that holds it; the gradient of each
    rank's columns is its softmax less the one-hot target, over the token count."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, group: dist.ProcessGroup,
                first_column: int) -> torch.Tensor:
        maxima = logits.max(dim=-1).values
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - maxima[:, None]
        exponentials = shifted.exp()
        sums = exponentials.sum(dim=-1)
        column = targets - first_column
        held = (column >= 0) & (column < logits.shape[-1])
        column = column.clamp(0, logits.shape[-1] - 1)
        target_logits = shifted.gather(1, column[:, None]).squeeze(1) * held
        reduced = torch.stack([sums, target_logits])
        dist.all_reduce(reduced, group=group)
        sums, target_logits = reduced
        ctx.save_for_backward(exponentials.div_(sums[:, None]), column, held)
        return (sums.log() - target_logits).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        softmax, column, held = ctx.saved_tensors
        softmax[torch.arange(len(column), device=column.device), column] -= held.to(softmax.dtype)
        return softmax * (grad / len(column)), None, None, None


@contextlib.contextmanager
def sharded_logits(model: MoEDiffTransformer) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None]:
    """Inside, a vocabulary-split head leaves each rank its own columns of the logits; yields the mean
    cross-entropy of such logits [B, T, V/tp] against targets [B, T] (None where the head is whole)."""
    head = model.output
    if not isinstance(head, VocabParallelHead):
        yield None
        return
    head.gather = False
    try:
        yield functools.partial(_vocab_parallel_cross_entropy, head=head)
    finally:
        head.gather = True


def _vocab_parallel_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, head: VocabParallelHead) -> torch.Tensor:
    return _VocabParallelCrossEntropy.apply(logits.flatten(0, 1).to(compute_dtype(logits.dtype)), targets.flatten(),
                                            head.group, head.first_column)


def parallelize_vocab(model: MoEDiffTransformer, group: dist.ProcessGroup) -> MoEDiffTransformer:
    """Run the embedding and the output head (tied or not) on blocks of vocabulary rows over `group`, in place (the
    plan lays the weights out)."""
    if model.cfg.vocab_size % group.size():
        raise ConfigError(f"parallel.vocab_parallel=true needs parallel.tp={group.size()} to divide "
                          f"model.vocab_size={model.cfg.vocab_size}")
    model.tok_embeddings = VocabParallelEmbedding(model.tok_embeddings, group)
    model.output = VocabParallelHead(model.output.weight, group)
    return model


def check_tensor_parallel(model: MoEDiffTransformer, tp: int) -> None:
    """Whole heads (pairs of them for diff), kv groups and FFN columns on every rank."""
    cfg = model.cfg
    pairs = 2 if cfg.attention == "diff" else 1
    whole = math.gcd(cfg.n_heads // pairs, cfg.n_kv_heads // pairs, cfg.ffn_dim)  # what every tp must divide
    fits = f"; parallel.tp that fit these shapes: {', '.join(str(d) for d in range(1, whole + 1) if whole % d == 0)}"
    for field, value in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads)):
        if value % (tp * pairs):
            raise ConfigError(f"parallel.tp={tp} must split model.{field}={value} into whole "
                              f"{'differential heads (pairs)' if pairs == 2 else 'heads'} per rank{fits}")
    if cfg.ffn_dim % tp:
        raise ConfigError(f"parallel.tp={tp} must divide model.ffn_dim={cfg.ffn_dim}{fits}")


@dataclass(frozen=True)
class _Regions:
    """Where activations enter and leave a block's split regions (attention heads, FFN columns) over `group`.
    With sequence parallelism, in training, the residual stream between them holds each rank's block of
    positions: gathered on the way in, reduce-scattered on the way out (instead of copied and all-reduced)."""

    group: dist.ProcessGroup
    sequence_parallel: bool

    def _by_positions(self, module: nn.Module) -> bool:
        return self.sequence_parallel and module.training

    def attention_input(self, module: nn.Module, args: tuple) -> tuple:
        x = (_GatherSequence.apply(args[0], self.group, True) if self._by_positions(module)
             else _CopyToGroup.apply(args[0], self.group))
        return (x, *args[1:])

    def partial_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        return (_ReduceScatterSequence.apply(out, self.group) if self._by_positions(module)
                else _SumOverGroup.apply(out, self.group))

    def moe_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Every position for the router, which each rank computes whole (so its gradient is not summed)."""
        return (_GatherSequence.apply(args[0], self.group, False),) if self._by_positions(module) else None

    def experts_input(self, module: nn.Module, args: tuple) -> tuple:
        """The tokens and their routing weights enter every rank's FFN part."""
        return _CopyToGroup.apply(args[0], self.group), args[1], _CopyToGroup.apply(args[2], self.group)

    def experts_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
        """Summed here, or by positions at the MoE's output."""
        return out if self._by_positions(module) else _SumOverGroup.apply(out, self.group)

    def moe_output(self, module: nn.Module, args: tuple, out: tuple) -> tuple | None:
        return (_ReduceScatterSequence.apply(out[0], self.group), *out[1:]) if self._by_positions(module) else None

    def embedding_output(self, module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        """The residual stream starts as this rank's block of positions of the lookups every rank made whole."""
        return _ScatterSequence.apply(out, self.group) if self._by_positions(module) else None

    def head_input(self, module: nn.Module, args: tuple) -> tuple | None:
        """Every position for the output head, which each rank computes whole (or its vocabulary columns of)."""
        return (_GatherSequence.apply(args[0], self.group, False),) if self._by_positions(module) else None


def parallelize_tensor(model: MoEDiffTransformer, group: dist.ProcessGroup,
                       sequence_parallel: bool = False) -> MoEDiffTransformer:
    """Run every layer's attention heads and experts' FFN columns split over `group` (each rank on the blocks of
    rows or columns the plan gives it, once the parameters are laid out): the activations copied into those
    regions and summed out of them. With `sequence_parallel`, in training, the residual stream and its norms hold
    each rank's block of positions (_Regions; the embedding's output is scattered by positions and the output
    head's input gathered)."""
    check_tensor_parallel(model, group.size())
    regions = _Regions(group, sequence_parallel)
    for block in model.layers:
        block.attention.n_kv_heads //= group.size()
        block.attention.register_forward_pre_hook(regions.attention_input)
        block.attention.wo.register_forward_hook(regions.partial_output)
        block.moe.register_forward_pre_hook(regions.moe_input)
        block.moe.register_forward_hook(regions.moe_output)
        block.moe.experts.register_forward_pre_hook(regions.experts_input)
        block.moe.experts.register_forward_hook(regions.experts_output)
    if sequence_parallel:
        model.tok_embeddings.register_forward_hook(regions.embedding_output)
        model.output.register_forward_pre_hook(regions.head_input)
    return model
