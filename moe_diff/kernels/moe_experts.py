"""Sparse SwiGLU experts: each token's output is the weighted sum of its top-k experts."""

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F


def moe_experts_reference(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                          w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """Loop over the experts that received tokens, gathering the tokens routed to each (transformers'
    style); only the chosen experts' weights are read, which makes it the fastest path for a few tokens.

    x: [N, D], expert_ids and weights: [N, K], w1 and w3: [E, F, D], w2: [E, D, F] -> [N, D].
    """
    out = torch.zeros_like(x)
    for expert in expert_ids.unique().tolist():
        token, slot = torch.where(expert_ids == expert)  # the (token, slot) pairs routed here
        h = x[token]
        y = F.linear(F.silu(F.linear(h, w1[expert])) * F.linear(h, w3[expert]), w2[expert])
        out.index_add_(0, token, y * weights[token, slot, None].to(y.dtype))
    return out


@torch.library.custom_op("moe_diff::experts_loop", mutates_args=())
def moe_experts_loop_op(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                        w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The reference as one opaque operator, so a compiled inference graph calls it whole (no autograd)."""
    return moe_experts_reference(x, expert_ids, weights, w1, w2, w3)


@moe_experts_loop_op.register_fake
def _(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
      w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


def moe_experts_gathered(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                         w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same for a handful of tokens with static shapes (compiled decode, as gpt-fast does it): each
    (token, slot) pair multiplies by its own expert's gathered weights, so only chosen experts are read.

    Compiled, the gather fuses into the matmul; eager, it copies N*K expert matrices, so keep N*K small.
    """
    rows = x[:, None, None, :].expand(-1, expert_ids.shape[1], 1, -1)  # [N, K, 1, D]
    hidden = F.silu(rows @ w1[expert_ids].transpose(-1, -2)) * (rows @ w3[expert_ids].transpose(-1, -2))
    out = (hidden @ w2[expert_ids].transpose(-1, -2))[:, :, 0]  # [N, K, D]
    return (out * weights[..., None].to(out.dtype)).sum(1)


grouped_mm = getattr(F, "grouped_mm", None) or torch._grouped_mm  # the private name on older torch
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class GroupedLinear(torch.autograd.Function):
    """y_g = x_g w_g^T for consecutive groups of rows of x; offs [E] holds each group's end row."""

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


class ExpertSorted(NamedTuple):
    """The (token, slot) pairs of a layer sorted by expert (stable: token order within each expert)."""

    rows: torch.Tensor  # [N*K, D] each pair's token activations, expert-major
    order: torch.Tensor  # [N*K] the flat pair index (token * K + slot) of each sorted row
    counts: torch.Tensor  # [E] rows per expert


def sort_by_expert(x: torch.Tensor, expert_ids: torch.Tensor, n_experts: int) -> ExpertSorted:
    """Gather by a permutation of the pairs (never by token index), so the backward has no colliding writes."""
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)
    pairs = x[:, None].expand(-1, expert_ids.shape[1], -1).reshape(-1, x.shape[1])  # [N*K, D] token-major
    return ExpertSorted(pairs[order], order, torch.bincount(flat, minlength=n_experts))


def combine_sorted(ys: torch.Tensor, sorted_pairs: ExpertSorted, weights: torch.Tensor) -> torch.Tensor:
    """[N, D]: each token's weighted expert outputs summed over its K slots in slot order (no atomics, so
    bitwise repeatable on every device)."""
    inverse = torch.empty_like(sorted_pairs.order)
    inverse[sorted_pairs.order] = torch.arange(len(inverse), device=inverse.device)
    n_tokens, top_k = weights.shape
    per_slot = ys[inverse].view(n_tokens, top_k, -1) * weights[..., None].to(ys.dtype)
    return per_slot.sum(1)


def swiglu_sorted(sorted_pairs: ExpertSorted, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor,
                  linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The experts' SwiGLU over expert-sorted rows, with `linear(rows, weight [E, out, in])` a grouped GEMM."""
    rows = sorted_pairs.rows
    return linear(F.silu(linear(rows, w1)) * linear(rows, w3), w2)


def moe_experts_grouped_mm(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same as the reference with three grouped GEMMs over the (token, slot) pairs sorted by expert.

    Experts that receive no token form empty groups (zero gradient); nothing waits on the host; outputs and
    gradients are bitwise repeatable (see combine_sorted).
    """
    if x.dtype not in GROUPED_MM_DTYPES:
        raise ValueError(f"moe_backend='grouped_mm' runs in float32, bfloat16 or float16, not {x.dtype}; use "
                         "moe_backend='reference' for float64")
    sorted_pairs = sort_by_expert(x, expert_ids, w1.shape[0])
    offs = sorted_pairs.counts.cumsum(0).to(torch.int32)
    ys = swiglu_sorted(sorted_pairs, w1, w2, w3, lambda rows, w: GroupedLinear.apply(rows, w, offs))
    return combine_sorted(ys, sorted_pairs, weights)


MEGABLOCKS_MISSING = ("moe_backend='megablocks' needs MegaBlocks with its grouped_gemm CUDA extension; install "
                      "it on a CUDA machine with pip install 'moe-diff[megablocks]' (see the README), or use "
                      "moe_backend='grouped_mm'")


def megablocks_gmm() -> Callable:
    """MegaBlocks' grouped GEMM, gmm(rows, weights [E, ...], batch_sizes on the host, trans_b)."""
    try:
        from megablocks import grouped_gemm_util
    except ImportError as error:
        raise ImportError(MEGABLOCKS_MISSING) from error
    if not grouped_gemm_util.grouped_gemm_is_available():
        raise ImportError(MEGABLOCKS_MISSING)
    return grouped_gemm_util.ops.gmm


def moe_experts_megablocks(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                           w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The same through MegaBlocks' grouped GEMM (CUDA, bf16/fp16). Its group sizes live on the host, so
    each layer waits for the router, as MegaBlocks' own dMoE does."""
    gmm = megablocks_gmm()
    sorted_pairs = sort_by_expert(x, expert_ids, w1.shape[0])
    batch_sizes = sorted_pairs.counts.cpu()
    ys = swiglu_sorted(sorted_pairs, w1, w2, w3, lambda rows, w: gmm(rows, w, batch_sizes, trans_b=True))
    return combine_sorted(ys, sorted_pairs, weights)
