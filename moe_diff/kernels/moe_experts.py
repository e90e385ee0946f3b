"""Sparse SwiGLU experts: each token's output is the weighted sum of its top-k experts.

Every backend takes x [N, D], expert_ids and weights [N, K], w1 and w3 [E, F, D], w2 [E, D, F] and returns [N, D].
An expert id of E marks an assignment dropped for capacity: it adds nothing, and every path whose shapes may
follow the data leaves it out of the computation (the static-shape paths of compiled decode steps run it at
weight 0).
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F

from moe_diff.errors import UsageError
from moe_diff.kernels import moe_permute
from moe_diff.kernels.moe_permute import PermutePlan
from moe_diff.kernels.precision import compute_dtype, matmul_dtype
from moe_diff.kernels.triton_compat import HAVE_TRITON


def moe_experts_reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                          w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Loop over the experts that received tokens, gathering the tokens routed to each (transformers'
    style); only the chosen experts' weights are read, which makes it the fastest path for a few tokens.

    x: [N, D], expert_ids and weights: [N, K], w1 and w3: [E, F, D], w2: [E, D, F] -> [N, D].
    """
    out = torch.zeros_like(x)
    for expert in expert_ids.unique().tolist():
        if expert == w1.shape[0]:  # the assignments dropped for capacity
            continue
        token, slot = torch.where(expert_ids == expert)  # the (token, slot) pairs routed here
        h = x[token]
        y = F.linear(F.silu(F.linear(h, w1[expert])) * F.linear(h, w3[expert]), w2[expert])
        out.index_add_(0, token, (y * weights[token, slot, None].to(y.dtype)).to(out.dtype))  # autocast: y's may differ
    return out


def moe_experts_pairs(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                      w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same for a single token on the CPU (eager decode at batch 1): one SwiGLU per (token, slot) pair, the
    expert's weights taken as views, so nothing is gathered or indexed but the pair's own row; the expert ids are
    read on the host.
    x: [N, D], expert_ids and weights: [N, K] -> [N, D]."""
    n_experts, rows = w1.shape[0], []
    for token, (experts, row_weights) in enumerate(zip(expert_ids.tolist(), weights.to(x.dtype), strict=True)):
        h = x[token]
        terms = [F.linear(F.silu(F.linear(h, w1[expert])) * F.linear(h, w3[expert]), w2[expert]) * row_weights[slot]
                 for slot, expert in enumerate(experts) if expert < n_experts]  # none for a dropped assignment
        rows.append(sum(terms[1:], terms[0]) if terms else torch.zeros_like(h))
    return torch.stack(rows) if rows else torch.zeros_like(x)


def moe_experts_sorted(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                       w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same in the fewest operators per expert, for inference on the CPU, where each operator costs about as much
    as a small GEMV: the (token, slot) pairs sorted by expert, the rows gathered once, each chosen expert one SwiGLU
    over its slice of them (the group sizes read on the host once), and one weighted scatter back.
    x: [N, D], expert_ids and weights: [N, K] -> [N, D]."""
    n_experts, top_k = w1.shape[0], expert_ids.shape[1]
    pairs = expert_ids.flatten()
    order = pairs.argsort(stable=True)  # expert-major; the pairs dropped for capacity (id E) last
    rows = x[order // top_k]
    outputs, start = [], 0
    for expert, count in enumerate(torch.bincount(pairs, minlength=n_experts + 1)[:n_experts].tolist()):
        if count:
            h = rows[start:start + count]
            outputs.append(F.linear(F.silu(F.linear(h, w1[expert])) * F.linear(h, w3[expert]), w2[expert]))
            start += count
    if not outputs:  # no tokens, or none kept
        return torch.zeros_like(x)
    kept = order[:start]
    y = torch.cat(outputs) * weights.flatten()[kept, None].to(outputs[0].dtype)
    return torch.zeros_like(x).index_add_(0, kept // top_k, y.to(x.dtype))  # autocast: y's dtype may differ


@torch.library.custom_op("moe_diff::experts_sorted", mutates_args=())
def moe_experts_sorted_op(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                          w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """moe_experts_sorted as one opaque operator, so a compiled inference graph calls it whole (no autograd)."""
    return moe_experts_sorted(x, expert_ids, weights, w1, w2, w3)


@moe_experts_sorted_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
      w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def moe_experts_gathered(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                         w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same for a handful of tokens with static shapes (compiled decode, as gpt-fast does it): each
    (token, slot) pair multiplies by its own expert's gathered weights, so only chosen experts are read.

    Compiled, the gather fuses into the matmul; eager, it copies N*K expert matrices, so keep N*K small.
    """
    kept = expert_ids < w1.shape[0]  # static shapes: a pair dropped for capacity runs expert 0 at weight 0
    expert_ids, weights = expert_ids * kept, weights * kept
    if x.is_cuda:  # as products and sums, so that inductor reads each gathered weight once, in one fused kernel
        rows, accumulate = x[:, None, None, :], compute_dtype(x.dtype)  # [N, 1, 1, D]
        hidden = F.silu((w1[expert_ids] * rows).sum(-1, dtype=accumulate)) * \
            (w3[expert_ids] * rows).sum(-1, dtype=accumulate)  # [N, K, F]
        out = (w2[expert_ids] * hidden.to(x.dtype)[:, :, None, :]).sum(-1, dtype=accumulate).to(x.dtype)
    else:  # on the CPU inductor fuses the gather into its matmul
        rows = x[:, None, None, :].expand(-1, expert_ids.shape[1], 1, -1)  # [N, K, 1, D]
        hidden = F.silu(rows @ w1[expert_ids].transpose(-1, -2)) * (rows @ w3[expert_ids].transpose(-1, -2))
        out = (hidden @ w2[expert_ids].transpose(-1, -2))[:, :, 0]  # [N, K, D]
    return (out * weights[..., None].to(out.dtype)).sum(1)


def moe_experts_every(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                      w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Every expert over every token, gated by a dense [N, E] matrix that is zero where the expert was not
    chosen: static shapes and no host synchronisation (CUDA graphs can capture it), each expert's weights read
    once. For compiled decode steps with more (token, slot) pairs than experts, where a step reads nearly every
    expert anyway; it does E/K times the needed FLOPs, which a few decode tokens per step can afford."""
    gates = torch.zeros(x.shape[0], w1.shape[0] + 1, dtype=weights.dtype, device=x.device)  # [N, E+1]
    gates = gates.scatter_add(1, expert_ids, weights)[:, :-1]  # [N, E]: the last column took the dropped pairs
    hidden = F.silu(x @ w1.transpose(1, 2)) * (x @ w3.transpose(1, 2))  # [E, N, F]
    out = hidden @ w2.transpose(1, 2)  # [E, N, D]
    return (out * gates.t()[..., None].to(out.dtype)).sum(0)


grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # the private name on older torch
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GroupedLinear(torch.autograd.Function):
    """y_g = x_g w_g^T for consecutive groups of rows of x; offs [E] holds each group's end row. Rows past the last
    group's end are not computed: their outputs and input gradients are left unset."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        # x: [M, D]  weight: [E, F, D]  ->  [M, F]
        ctx.save_for_backward(x, weight, offs)
        return grouped_mm(x, weight.transpose(1, 2), offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, offs = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grouped_mm(grad, weight, offs=offs) if ctx.needs_input_grad[0] else None
        grad_weight = grouped_mm(grad.t(), x, offs=offs) if ctx.needs_input_grad[1] else None  # [E, F, D]
        return grad_x, grad_weight, None


def permutation_ops(device: torch.device) -> tuple[Callable, Callable, Callable]:
    """(plan, gather, combine) from moe_permute: the Triton kernels on CUDA where triton imports, their
    PyTorch references elsewhere. Both sum each token's slots in a fixed order, without atomics."""
    if device.type == "cuda" and HAVE_TRITON:
        return moe_permute.permute_plan, moe_permute.gather, moe_permute.combine
    return moe_permute.permute_plan_reference, moe_permute.gather_reference, moe_permute.combine_reference


def sorted_swiglu(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor,
                  w2: torch.Tensor, w3: torch.Tensor,
                  grouped_linear_for: Callable[[PermutePlan], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]],
                  ) -> torch.Tensor:
    """Sort the (token, slot) pairs by expert, run the SwiGLU with the grouped GEMM `grouped_linear_for(plan)`
    (rows, weight [E, out, in]) -> rows @ weight[group]^T, and combine each token's slots back. The pairs dropped
    for capacity sort after every group, where the GEMMs, which end at the last group's end, do not reach and the
    combine skips them. Under autocast the rows and weights are cast as F.linear's would be (grouped GEMMs are not
    on autocast's list)."""
    dtype = matmul_dtype(x)
    x, w1, w2, w3 = (t.to(dtype) for t in (x, w1, w2, w3))
    plan, gather, combine = permutation_ops(x.device)
    routed = plan(expert_ids, w1.shape[0])
    linear = grouped_linear_for(routed)
    rows = gather(x, routed)  # [N*K, D] expert-major, the dropped pairs' rows last (zero)
    hidden = F.silu(linear(rows, w1)) * linear(rows, w3)
    return combine(linear(hidden, w2), routed, weights)


def grouped_mm_applies(x: torch.Tensor, w1: torch.Tensor) -> bool:
    """grouped_mm's rules: float32, bfloat16 or float16 (after autocast), rows of whole 16-byte blocks (dim and
    ffn_dim multiples of 8), and bfloat16 alone under torch.compile (the only dtype its fake kernel accepts)."""
    dtype = matmul_dtype(x)
    compiled_rule = dtype == torch.bfloat16 or not torch.compiler.is_compiling()
    return dtype in GROUPED_MM_DTYPES and w1.shape[1] % 8 == 0 and w1.shape[2] % 8 == 0 and compiled_rule


def moe_experts_auto(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                     w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The fastest correct backend for these inputs (benchmarks/results/moe-*.json): on the CPU in eager inference
    one token runs pair by pair and more tokens sorted by expert (1.04-1.35x grouped_mm's speed at 4-2048 tokens in
    moe-cpu.json); otherwise grouped_mm where its
    rules hold (on an H100 1.5-2.6x the loop's speed at Mixtral's layer shape; on the CPU 1.1-4x in training);
    the loop where they do not (float64, unaligned shapes)."""
    if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
        inference = moe_experts_pairs if x.shape[0] == 1 else moe_experts_sorted
        return inference(x, expert_ids, weights, w1, w2, w3)
    if grouped_mm_applies(x, w1):
        return moe_experts_grouped_mm(x, expert_ids, weights, w1, w2, w3)
    return moe_experts_reference(x, expert_ids, weights, w1, w2, w3)


def moe_experts_grouped_mm(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same as the reference with three grouped GEMMs over the (token, slot) pairs sorted by expert.

    Experts that receive no token form empty groups (zero gradient); nothing waits on the host; outputs and
    gradients are bitwise repeatable (see permutation_ops).
    """
    if (dtype := matmul_dtype(x)) not in GROUPED_MM_DTYPES:
        raise UsageError(f"moe_backend='grouped_mm' runs in float32, bfloat16 or float16, not {dtype}; use "
                         "moe_backend='reference' for float64")
    return sorted_swiglu(x, expert_ids, weights, w1, w2, w3,
                         lambda plan: lambda rows, w: GroupedLinear.apply(rows, w, plan.offsets))


MEGABLOCKS_MISSING = ("moe_backend='megablocks' needs MegaBlocks' grouped GEMM, the grouped_gemm package with its "
                      "CUDA extension: on a CUDA machine pip install 'moe-diff[megablocks]', or without a package "
                      "index benchmarks/build_megablocks.sh (see docs/kernels.md); or use moe_backend='grouped_mm'")


def megablocks_gmm() -> Callable:
    """MegaBlocks' grouped GEMM, gmm(rows, weights [E, ...], batch_sizes on the host, trans_b), from the
    grouped_gemm package it is built on (megablocks.grouped_gemm_util only re-exports it): grouped_gemm alone,
    without megablocks itself, makes the backend available."""
    try:
        from grouped_gemm import ops
    except ImportError as error:
        raise ImportError(MEGABLOCKS_MISSING) from error
    return ops.gmm


def megablocks_available() -> bool:
    """Whether the megablocks backend can run here: grouped_gemm with its CUDA extension, and a CUDA device."""
    try:
        megablocks_gmm()
    except ImportError:
        return False
    return torch.cuda.is_available()


def moe_experts_megablocks(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same through MegaBlocks' grouped GEMM (CUDA, bf16/fp16). Its group sizes live on the host, so
    each layer waits for the router, as MegaBlocks' own dMoE does."""
    gmm = megablocks_gmm()

    def grouped_linear_for(plan: PermutePlan) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        batch_sizes = plan.counts.cpu()  # one wait per layer, shared by its three GEMMs
        return lambda rows, w: gmm(rows, w, batch_sizes, trans_b=True)

    return sorted_swiglu(x, expert_ids, weights, w1, w2, w3, grouped_linear_for)
