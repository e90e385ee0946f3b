"""Where every parameter (and stored buffer) of the model lives over the job's mesh, declared once: one entry per
tensor (no default), naming the tensor dimension split over each mesh dimension, or how a replicated parameter's
gradient is completed; and the ParallelStyle of each module that runs its part of a split layer. The rest of the
package reads placements and styles from here and says nowhere else how a parameter or module is split."""

from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass

from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor import Placement as TensorPlacement
from torch.distributed.tensor.parallel import ParallelStyle

from moe_diff.parallel.context_parallel import ContextParallel
from moe_diff.parallel.expert_parallel import ExpertParallel
from moe_diff.parallel.tensor_parallel import (
    EmbeddingParallel,
    FfnParallel,
    HeadParallel,
    OutputHeadParallel,
    RowParallelLinear,
    SequenceParallelMoE,
)


@dataclass(frozen=True)
class Placement:
    """A parameter over the mesh: `ep` and `tp` the tensor dimension split over those mesh dimensions (None:
    replicated); `vocab` the dimension split over tp with parallel.vocab_parallel (else replicated); `tp_sum`
    for a replicated parameter that each tp rank uses for its own heads only, so that its gradient is the sum of
    the ranks' parts; `sequence_sum` for one that, with parallel.sequence_parallel, each tp rank applies to its
    own positions only (the same sum)."""

    ep: int | None = None
    tp: int | None = None
    vocab: int | None = None
    tp_sum: bool = False
    sequence_sum: bool = False

    def partial_over_tp(self, sequence_parallel: bool) -> bool:
        """Whether each tp rank's gradient is only its part of the whole (summed over tp)."""
        return self.tp_sum or (sequence_parallel and self.sequence_sum)

    def tp_dim(self, vocab_parallel: bool) -> int | None:
        """The dimension split over tp in a job with or without the vocabulary split."""
        return self.vocab if vocab_parallel and self.vocab is not None else self.tp


REPLICATED = Placement()
COLUMNS = Placement(tp=0)  # a linear's output rows: whole heads (pairs of them for diff) and kv groups per rank
ROWS = Placement(tp=1)  # a linear's input columns, its output summed over tp
OWN_HEADS = Placement(tp_sum=True)
NORM = Placement(sequence_sum=True)  # a norm of the residual stream, which sequence parallelism splits

# parameter name (fnmatch pattern; * is a layer index) -> its placement
PLAN: dict[str, Placement] = {
    "tok_embeddings.weight": Placement(vocab=0),
    "layers.*.attention_norm.weight": NORM,
    "layers.*.attention.wq.weight": COLUMNS,
    "layers.*.attention.wk.weight": COLUMNS,
    "layers.*.attention.wv.weight": COLUMNS,
    "layers.*.attention.wo.weight": ROWS,
    "layers.*.attention.lambda_q1": OWN_HEADS,  # diff: the layer's λ, computed on every rank for its heads
    "layers.*.attention.lambda_k1": OWN_HEADS,
    "layers.*.attention.lambda_q2": OWN_HEADS,
    "layers.*.attention.lambda_k2": OWN_HEADS,
    "layers.*.attention.subln.weight": OWN_HEADS,  # diff: the per-head norm's weight, shared by every head
    "layers.*.attention.lambda_proj.weight": COLUMNS,  # diff_v2: one λ row per query-head pair
    "layers.*.ffn_norm.weight": NORM,
    "layers.*.moe.gate.weight": REPLICATED,
    "layers.*.moe.expert_bias": REPLICATED,  # a buffer (model.expert_bias_rate > 0), kept equal by global counts
    "layers.*.moe.experts.w1": Placement(ep=0, tp=1),  # [E, F, D]: experts over ep, then ffn_dim over tp
    "layers.*.moe.experts.w3": Placement(ep=0, tp=1),
    "layers.*.moe.experts.w2": Placement(ep=0, tp=2),  # [E, D, F]
    "norm.weight": NORM,
    "output.weight": Placement(vocab=0),
}


class UnplannedParameter(KeyError):
    """A parameter with no entry in PLAN (or more than one)."""


@functools.cache
def placement(name: str) -> Placement:
    """The placement of parameter `name` (as model.named_parameters() names it); UnplannedParameter if PLAN
    has no entry, or several, for it."""
    found = [entry for pattern, entry in PLAN.items() if fnmatch.fnmatchcase(name, pattern)]
    if len(found) != 1:
        raise UnplannedParameter(f"{name} has {len(found)} entries in moe_diff/parallel/plan.py PLAN; every "
                                 "parameter needs exactly one, saying how it is split over the mesh")
    return found[0]


@dataclass(frozen=True)
class Layout:
    """A parameter as a DTensor in one job: the mesh dimensions it is split (or its gradient summed) over, its
    placements there, and its gradient's (Partial where each rank's gradient is its part of the sum)."""

    mesh_dims: tuple[str, ...]
    placements: tuple[TensorPlacement, ...]
    grad_placements: tuple[TensorPlacement, ...]


def layout(name: str, ep: int, tp: int, vocab_parallel: bool, sequence_parallel: bool) -> Layout | None:
    """How parameter `name` lies over a job's ep and tp dimensions (None: whole on every rank)."""
    planned = placement(name)
    split: list[tuple[str, TensorPlacement, TensorPlacement]] = []  # (mesh dimension, placement, gradient's)
    if ep > 1 and planned.ep is not None:
        split.append(("ep", Shard(planned.ep), Shard(planned.ep)))
    if tp > 1 and (dim := planned.tp_dim(vocab_parallel)) is not None:
        split.append(("tp", Shard(dim), Shard(dim)))
    elif tp > 1 and planned.partial_over_tp(sequence_parallel):
        split.append(("tp", Replicate(), Partial()))
    if not split:
        return None
    mesh_dims, placements, grad_placements = zip(*split, strict=True)
    return Layout(mesh_dims, placements, grad_placements)


# expert parallelism: each rank runs its block of every layer's experts, the tokens sent to them and back
EXPERT_STYLES: dict[str, ParallelStyle] = {"layers.*.moe.experts": ExpertParallel()}


def module_plan(ep: int, tp: int, cp: int, vocab_parallel: bool, sequence_parallel: bool
                ) -> dict[str, dict[str, ParallelStyle]]:
    """How a job's layers run split: for ep, tp and cp where they exceed 1, in that order, the ParallelStyle of
    each module (paths as parallelize_module matches them; * is a layer index), which makes the module run its
    part and says where its activations cross ranks."""
    plan: dict[str, dict[str, ParallelStyle]] = {}
    if ep > 1:
        plan["ep"] = EXPERT_STYLES
    if tp > 1:
        sp = sequence_parallel
        plan["tp"] = {
            "layers.*.attention": HeadParallel(sp),  # this rank's heads: the input copied in (or gathered)
            "layers.*.attention.wo": RowParallelLinear(sp),  # partial outputs summed (or reduce-scattered)
            "layers.*.moe.experts": FfnParallel(sp),  # this rank's ffn columns of every expert
        }
        if sp:
            plan["tp"]["layers.*.moe"] = SequenceParallelMoE(sp)  # every position for the router
        if sp or vocab_parallel:
            plan["tp"]["tok_embeddings"] = EmbeddingParallel(vocab_parallel, sp)
            plan["tp"]["output"] = OutputHeadParallel(vocab_parallel, sp)
    if cp > 1:  # each rank's positions of every sequence: attention receives the earlier keys they may see
        plan["cp"] = {"layers.*.attention": ContextParallel()}
    return plan
