"""Tensor parallelism (Megatron style) as ParallelStyles, which the plan (plan.module_plan) assigns to a finished
model's modules: wq, wk, wv (and diff_v2's lambda_proj) split by output rows so every rank keeps whole
differential heads and kv groups, wo split by input columns, and every expert's FFN split along ffn_dim.
Activations entering a split region are copied (their gradient is summed over the group); the outputs of wo and
of the experts are summed over the group (with parallel.sequence_parallel, in training, gathered by positions on
the way in and reduce-scattered on the way out). The model's reshapes use -1 heads, so it runs on its local
heads unchanged. Optionally (parallel.vocab_parallel) the embedding and output head split the vocabulary: each
rank looks up its rows (the group sums the lookups) and computes its columns of the logits, which the training
loss takes as they are (sharded_logits: no rank holds the whole logits) and everything else gathers whole.
"""

from __future__ import annotations

import contextlib
import functools
import math
from abc import abstractmethod
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ParallelStyle

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


# torch 2.13 names these *_single (the older names warn, once per process); earlier releases have only the older
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _gather_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T/tp, ...] on each rank -> [B, T, ...], rank r's positions the r-th block."""
    gathered = x.new_empty((group.size() * x.shape[1], x.shape[0], *x.shape[2:]))
    _all_gather_single(gathered, x.transpose(0, 1).contiguous(), group=group)
    return gathered.transpose(0, 1)


def _sum_own_positions(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[B, T, ...] on each rank -> the group's sum of this rank's block of positions, [B, T/tp, ...]."""
    mine = x.new_empty((x.shape[1] // group.size(), x.shape[0], *x.shape[2:]))
    _reduce_scatter_single(mine, x.transpose(0, 1).contiguous(), group=group)
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


class VocabParallelEmbedding(nn.Embedding):
    """The embedding, of which this rank holds a block of rows once it is laid out (EmbeddingParallel makes a
    model's embedding one): a token outside them looks up zeros and the group's lookups are summed."""

    group: dist.ProcessGroup
    first_row: int

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = tokens - self.first_row
        outside = (rows < 0) | (rows >= self.weight.shape[0])
        looked_up = F.embedding(rows.masked_fill(outside, 0), self.weight).masked_fill(outside[..., None], 0)
        return _SumOverGroup.apply(looked_up, self.group)


class VocabParallelHead(nn.Linear):
    """The output head, of which this rank holds a block of rows once it is laid out (OutputHeadParallel makes a
    model's head one): its columns of the logits, gathered whole but inside sharded_logits()."""

    group: dist.ProcessGroup
    first_column: int
    gather: bool

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


def check_tensor_parallel(model: MoEDiffTransformer, tp: int, vocab_parallel: bool) -> None:
    """Whole heads (pairs of them for diff), kv groups and FFN columns on every rank, and with `vocab_parallel`
    whole blocks of vocabulary rows."""
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
    if vocab_parallel and cfg.vocab_size % tp:
        raise ConfigError(f"parallel.vocab_parallel=true needs parallel.tp={tp} to divide "
                          f"model.vocab_size={cfg.vocab_size}")


class _TensorParallelStyle(ParallelStyle):
    """How a module's activations cross the tp group. With sequence parallelism, in training, the residual stream
    outside the split regions holds each rank's block of positions: gathered on the way in, reduce-scattered on
    the way out (instead of copied and all-reduced)."""

    def __init__(self, sequence_parallel: bool) -> None:
        self.sequence_parallel = sequence_parallel

    def by_positions(self, module: nn.Module) -> bool:
        return self.sequence_parallel and module.training

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        self.install(module, device_mesh.get_group())
        return module

    @abstractmethod
    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        """Make `module` run its part over `group` and register where its activations cross it."""


class HeadParallel(_TensorParallelStyle):
    """Attention on this rank's heads (whole pairs for diff) and kv groups: its input copied in (the gradient
    summed over the group, each rank's heads having used it), or gathered by positions."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        module.n_kv_heads //= group.size()

        def enter(module: nn.Module, args: tuple) -> tuple:
            x = (_GatherSequence.apply(args[0], group, True) if self.by_positions(module)
                 else _CopyToGroup.apply(args[0], group))
            return (x, *args[1:])

        module.register_forward_pre_hook(enter)


class RowParallelLinear(_TensorParallelStyle):
    """A linear split by input columns (wo): the ranks' partial outputs summed, or reduce-scattered by positions."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        def leave(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return (_ReduceScatterSequence.apply(out, group) if self.by_positions(module)
                    else _SumOverGroup.apply(out, group))

        module.register_forward_hook(leave)


class FfnParallel(_TensorParallelStyle):
    """Experts split along ffn_dim: the tokens and their routing weights copied in; the ranks' partial outputs
    summed here, or, by positions, at the MoE layer's output (SequenceParallelMoE)."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        def enter(module: nn.Module, args: tuple) -> tuple:
            return _CopyToGroup.apply(args[0], group), args[1], _CopyToGroup.apply(args[2], group)

        def leave(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor:
            return out if self.by_positions(module) else _SumOverGroup.apply(out, group)

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)


def _gather_whole(group: dist.ProcessGroup, style: _TensorParallelStyle) -> Callable[[nn.Module, tuple], tuple | None]:
    """A pre-hook that, by positions, gathers every position into a module each rank computes whole (its gradient
    not summed over the group)."""
    def enter(module: nn.Module, args: tuple) -> tuple | None:
        return (_GatherSequence.apply(args[0], group, False),) if style.by_positions(module) else None

    return enter


class SequenceParallelMoE(_TensorParallelStyle):
    """With sequence parallelism: every position enters the MoE layer, for the router, which each rank computes
    whole (so its gradient is not summed); the experts' partial outputs leave reduce-scattered by positions."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        def leave(module: nn.Module, args: tuple, out: tuple) -> tuple | None:
            return (_ReduceScatterSequence.apply(out[0], group), *out[1:]) if self.by_positions(module) else None

        module.register_forward_pre_hook(_gather_whole(group, self))
        module.register_forward_hook(leave)


class _VocabularyStyle(_TensorParallelStyle):
    """The embedding's or the output head's, which with `vocab_parallel` split the vocabulary over the group."""

    def __init__(self, vocab_parallel: bool, sequence_parallel: bool) -> None:
        super().__init__(sequence_parallel)
        self.vocab_parallel = vocab_parallel


class EmbeddingParallel(_VocabularyStyle):
    """The embedding: with `vocab_parallel`, a VocabParallelEmbedding; with sequence parallelism, its output (the
    lookups every rank made whole) scattered, so the residual stream starts as this rank's block of positions."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        if self.vocab_parallel:
            rows = module.weight.shape[0] // group.size()
            module.__class__, module.group, module.first_row = VocabParallelEmbedding, group, group.rank() * rows

        def leave(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            return _ScatterSequence.apply(out, group) if self.by_positions(module) else None

        if self.sequence_parallel:
            module.register_forward_hook(leave)


class OutputHeadParallel(_VocabularyStyle):
    """The output head: with `vocab_parallel`, a VocabParallelHead; with sequence parallelism, every position
    gathered into it, which each rank computes whole (or its vocabulary columns of)."""

    def install(self, module: nn.Module, group: dist.ProcessGroup) -> None:
        if self.vocab_parallel:
            columns = module.weight.shape[0] // group.size()
            module.__class__, module.group, module.gather = VocabParallelHead, group, True
            module.first_column = group.rank() * columns
        if self.sequence_parallel:
            module.register_forward_pre_hook(_gather_whole(group, self))

