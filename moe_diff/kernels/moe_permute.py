"""Token permutation for sparse experts (MegaBlocks style): no dense [tokens x experts] dispatch tensor.

A plan sorts the N*K (token, slot) pairs by expert, stably (token order within each expert); `gather`
copies each pair's token into an expert-major buffer [N*K, D], and `combine` sums each token's K expert
outputs weighted by its routing weights, in slot order and in float32 (float64 for float64), one program
per token and no atomics, so results repeat bit for bit. Expert ids must lie in [0, n_experts]; the
launchers do not check this, since that would wait on the device. An id of n_experts marks a pair dropped for
capacity: the plan puts those after every expert's group (past offsets[-1], where grouped GEMMs end), `gather`
leaves their rows zero and `combine` skips them, so whatever those rows hold downstream adds nothing.
"""

from typing import NamedTuple

import torch

from moe_diff.kernels.triton_compat import tl, triton

PLAN_BLOCK = 1024  # (token, slot) pairs a plan program scans at a time
MAX_BLOCK_D = 1024  # columns of the feature dimension a gather or combine program handles at a time
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class PermutePlan(NamedTuple):
    """Where each (token, slot) pair goes in the expert-major buffer and how many rows each expert gets."""

    order: torch.Tensor  # [N*K] int64: flat pair index t*K+k of each permuted row
    rows: torch.Tensor  # [N*K] int64: source token of each permuted row (order // K)
    counts: torch.Tensor  # [E] int64: rows per expert
    offsets: torch.Tensor  # [E] int32: end row of each expert's group (grouped_mm's `offs`); the dropped pairs after


# ids: [N*K] int64  ->  counts: [E] int64; one program per expert
@triton.jit
def _count_kernel(ids_ptr, counts_ptr, n_pairs, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    hits = tl.zeros([BLOCK], dtype=tl.int64)
    for start in range(0, n_pairs, BLOCK):
        index = start + tl.arange(0, BLOCK)
        ids = tl.load(ids_ptr + index, mask=index < n_pairs, other=-1)
        hits += (ids == expert).to(tl.int64)
    tl.store(counts_ptr + expert, tl.sum(hits, axis=0))


# ids: [N*K] int64  counts: [E] int64  ->  order, rows: [N*K] int64  offsets: [E] int32
# one program per expert, and one more (expert == n_experts) for the pairs dropped for capacity
@triton.jit
def _plan_kernel(ids_ptr, counts_ptr, order_ptr, rows_ptr, offsets_ptr, n_pairs, n_experts, top_k,
                 BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    expert = tl.program_id(0)
    experts = tl.arange(0, BLOCK_E)
    counts = tl.load(counts_ptr + experts, mask=experts < n_experts, other=0)
    base = tl.sum(tl.where(experts < expert, counts, 0), axis=0)  # rows of the experts before this one
    tl.store(offsets_ptr + expert, (base + tl.sum(tl.where(experts == expert, counts, 0), axis=0)).to(tl.int32),
             mask=expert < n_experts)
    for start in range(0, n_pairs, BLOCK):
        index = start + tl.arange(0, BLOCK)
        hit = tl.load(ids_ptr + index, mask=index < n_pairs, other=-1) == expert
        hits = hit.to(tl.int64)
        dest = base + tl.cumsum(hits, axis=0) - 1  # stable: the pairs keep their flat order
        tl.store(order_ptr + dest, index.to(tl.int64), mask=hit)
        tl.store(rows_ptr + dest, (index // top_k).to(tl.int64), mask=hit)
        base += tl.sum(hits, axis=0)


# order: [N*K] int64  ->  positions: [N*K] int64, positions[order[r]] = r (row of pair t*K+k)
@triton.jit
def _invert_kernel(order_ptr, positions_ptr, n_pairs, BLOCK: tl.constexpr):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n_pairs
    tl.store(positions_ptr + tl.load(order_ptr + index, mask=mask, other=0), index, mask=mask)


# src: [N, D]  rows, order: [N*K] int64  weights: [N*K]  end: [1] int32  ->  out: [N*K, D],
# out[r] = src[rows[r]] (* weights[order[r]]) for r < end, 0 past it; one program per (permuted row, block of D)
@triton.jit
def _gather_kernel(src_ptr, rows_ptr, order_ptr, weights_ptr, end_ptr, out_ptr, dim,
                   HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    width = tl.where(row < tl.load(end_ptr), dim, 0)  # nothing to read for a dropped pair's row
    values = tl.load(src_ptr + tl.load(rows_ptr + row) * dim + cols, mask=cols < width, other=0)
    if HAS_WEIGHTS:
        values = values.to(ACC) * tl.load(weights_ptr + tl.load(order_ptr + row)).to(ACC)
    tl.store(out_ptr + row * dim + cols, values.to(out_ptr.dtype.element_ty), mask=mask)


# ys: [N*K, D]  positions, weights: [N*K] (pair t*K+k)  end: [1] int32  ->  out: [N, D],
# out[t] = sum_k ys[positions[t*K+k]] (* w) over the positions before end; one program per (token, block of D),
# summing in slot order
@triton.jit
def _combine_kernel(ys_ptr, positions_ptr, weights_ptr, end_ptr, out_ptr, dim, top_k,
                    HAS_WEIGHTS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < dim
    end = tl.load(end_ptr)
    acc = tl.zeros([BLOCK_D], dtype=ACC)
    for slot in range(top_k):
        pair = token * top_k + slot
        position = tl.load(positions_ptr + pair)
        width = tl.where(position < end, dim, 0)  # nothing to read for a dropped pair
        values = tl.load(ys_ptr + position * dim + cols, mask=cols < width, other=0.0).to(ACC)
        if HAS_WEIGHTS:
            values = values * tl.load(weights_ptr + pair).to(ACC)
        acc += values
    tl.store(out_ptr + token * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=mask)


# grad: [N, D]  ys: [N*K, D]  positions: [N*K]  end: [1] int32  ->  out: [N, K],
# out[t, k] = <grad[t], ys[positions[t*K+k]]>, 0 where the position is at or past end; one program per token
@triton.jit
def _weight_grad_kernel(grad_ptr, ys_ptr, positions_ptr, end_ptr, out_ptr, dim, top_k,
                        ACC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slots = tl.arange(0, BLOCK_K)
    slot_mask = slots < top_k
    positions = tl.load(positions_ptr + token * top_k + slots, mask=slot_mask, other=0)
    kept = slot_mask & (positions < tl.load(end_ptr))
    acc = tl.zeros([BLOCK_K], dtype=ACC)
    for start in range(0, dim, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_mask = cols < dim
        grad = tl.load(grad_ptr + token * dim + cols, mask=col_mask, other=0.0).to(ACC)
        ys = tl.load(ys_ptr + positions[:, None] * dim + cols[None, :], mask=kept[:, None] & col_mask[None, :],
                     other=0.0).to(ACC)
        acc += tl.sum(ys * grad[None, :], axis=1)
    tl.store(out_ptr + token * top_k + slots, acc.to(out_ptr.dtype.element_ty), mask=slot_mask)


def _accumulator(dtype: torch.dtype) -> tl.dtype:
    """float64 sums for float64 data, float32 sums otherwise."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block(n: int, cap: int) -> int:
    """Elements per program: n rounded up to a power of two, at least 16 and at most `cap`."""
    return min(max(triton.next_power_of_2(n), 16), cap)


def _check_pairs(name: str, tensor: torch.Tensor, n_pairs: int, device: torch.device) -> None:
    """Raise ValueError unless `tensor` is an int64 vector of n_pairs entries on `device`."""
    if tensor.dtype != torch.int64 or tensor.shape != (n_pairs,) or tensor.device != device:
        raise ValueError(f"{name} must be int64 of shape ({n_pairs},) on {device}, got {tensor.dtype} "
                         f"{tuple(tensor.shape)} on {tensor.device}")


def _check_weights(weights: torch.Tensor, n_tokens: int, top_k: int, device: torch.device) -> None:
    """Raise ValueError unless `weights` are floating routing weights [n_tokens, top_k] on `device`."""
    if not weights.is_floating_point() or weights.shape != (n_tokens, top_k) or weights.device != device:
        raise ValueError(f"weights must be floating of shape ({n_tokens}, {top_k}) on {device}, got {weights.dtype} "
                         f"{tuple(weights.shape)} on {weights.device}")


def _check_rows(name: str, tensor: torch.Tensor, rows: str) -> None:
    """Raise ValueError unless `tensor` is a [rows, D] matrix of a supported float dtype."""
    if tensor.dim() != 2 or tensor.dtype not in DTYPES:
        raise ValueError(f"{name} must be [{rows}, D] of {DTYPES}, got {tensor.dtype} {tuple(tensor.shape)}")


def launch_plan(expert_ids: torch.Tensor, n_experts: int) -> PermutePlan:
    """The permutation plan computed on the device; identical to permute_plan_reference."""
    if expert_ids.dtype != torch.int64 or expert_ids.dim() != 2:
        raise ValueError(f"expert_ids must be int64 [N, K], got {expert_ids.dtype} {tuple(expert_ids.shape)}")
    if n_experts < 1:
        raise ValueError(f"n_experts must be positive, got {n_experts}")
    ids = expert_ids.contiguous().view(-1)
    n_pairs, device = ids.numel(), ids.device
    counts = torch.empty(n_experts, dtype=torch.int64, device=device)
    order = torch.empty(n_pairs, dtype=torch.int64, device=device)
    rows = torch.empty(n_pairs, dtype=torch.int64, device=device)
    offsets = torch.empty(n_experts, dtype=torch.int32, device=device)
    block = _block(n_pairs, PLAN_BLOCK)
    _count_kernel[(n_experts,)](ids, counts, n_pairs, BLOCK=block)
    _plan_kernel[(n_experts + 1,)](ids, counts, order, rows, offsets, n_pairs, n_experts, expert_ids.shape[1],
                                   BLOCK=block, BLOCK_E=triton.next_power_of_2(n_experts))
    return PermutePlan(order, rows, counts, offsets)


def launch_invert(order: torch.Tensor) -> torch.Tensor:
    """positions [N*K]: the permuted row of each (token, slot) pair t*K+k, the inverse of plan.order."""
    _check_pairs("plan.order", order, order.numel(), order.device)
    positions = torch.empty_like(order)
    block = _block(order.numel(), PLAN_BLOCK)
    _invert_kernel[(triton.cdiv(order.numel(), block),)](order, positions, order.numel(), BLOCK=block)
    return positions


def launch_gather(src: torch.Tensor, plan: PermutePlan, weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N*K, D]: row plan.rows[r] of src [N, D] for each permuted row r, times its pair's weight if given [N, K];
    zero for the rows of dropped pairs."""
    _check_rows("x", src, "N")
    (n_tokens, dim), n_pairs = src.shape, plan.order.numel()
    if n_pairs % n_tokens if n_tokens else n_pairs:
        raise ValueError(f"the plan's {n_pairs} (token, slot) pairs are not top_k per token for {n_tokens} tokens")
    _check_pairs("plan.order", plan.order, n_pairs, src.device)
    _check_pairs("plan.rows", plan.rows, n_pairs, src.device)
    if weights is not None:
        _check_weights(weights, n_tokens, n_pairs // n_tokens, src.device)
    out = torch.empty(n_pairs, dim, dtype=src.dtype, device=src.device)
    block_d = _block(dim, MAX_BLOCK_D)
    _gather_kernel[(n_pairs, triton.cdiv(dim, block_d))](
        src.contiguous(), plan.rows, plan.order, src if weights is None else weights.contiguous(), plan.offsets[-1:],
        out, dim, HAS_WEIGHTS=weights is not None, ACC=_accumulator(src.dtype), BLOCK_D=block_d)
    return out


def launch_combine(ys: torch.Tensor, positions: torch.Tensor, end: torch.Tensor, top_k: int,
                   weights: torch.Tensor | None = None) -> torch.Tensor:
    """[N, D]: each token's K rows of ys [N*K, D] summed in slot order, times its weights [N, K] if given, leaving
    out the rows at or past end [1] (a plan's offsets[-1:]: those of dropped pairs)."""
    _check_rows("ys", ys, "N*K")
    n_pairs, dim = ys.shape
    if top_k < 1 or n_pairs % top_k:
        raise ValueError(f"ys has {n_pairs} rows, not a multiple of top_k={top_k}")
    _check_pairs("plan.order", positions, n_pairs, ys.device)
    if weights is not None:
        _check_weights(weights, n_pairs // top_k, top_k, ys.device)
    out = torch.empty(n_pairs // top_k, dim, dtype=ys.dtype, device=ys.device)
    block_d = _block(dim, MAX_BLOCK_D)
    _combine_kernel[(n_pairs // top_k, triton.cdiv(dim, block_d))](
        ys.contiguous(), positions, ys if weights is None else weights.contiguous(), end, out, dim, top_k,
        HAS_WEIGHTS=weights is not None, ACC=_accumulator(ys.dtype), BLOCK_D=block_d)
    return out


def launch_weight_grad(grad: torch.Tensor, ys: torch.Tensor, positions: torch.Tensor, end: torch.Tensor, top_k: int,
                       dtype: torch.dtype) -> torch.Tensor:
    """[N, K] in `dtype`: the dot product of each token's output gradient [N, D] with each of its K rows of ys, 0 for
    the rows at or past end [1]."""
    n_tokens, dim = grad.shape
    out = torch.empty(n_tokens, top_k, dtype=dtype, device=grad.device)
    _weight_grad_kernel[(n_tokens,)](grad.contiguous(), ys.contiguous(), positions, end, out, dim, top_k,
                                     ACC=_accumulator(ys.dtype), BLOCK_K=triton.next_power_of_2(top_k),
                                     BLOCK_D=_block(dim, MAX_BLOCK_D))
    return out


class Gather(torch.autograd.Function):
    """xs = x[plan.rows] (dropped pairs' rows zero); the backward sums each token's kept row gradients (an unweighted
    combine)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, plan: PermutePlan) -> torch.Tensor:
        # x: [N, D]  ->  [N*K, D]
        out = launch_gather(x, plan)
        ctx.save_for_backward(plan.order, plan.offsets)
        ctx.top_k = plan.order.numel() // x.shape[0] if x.shape[0] else 1
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        order, offsets = ctx.saved_tensors
        return launch_combine(grad, launch_invert(order), offsets[-1:], ctx.top_k), None


class Combine(torch.autograd.Function):
    """out[t] = sum_k weights[t, k] ys[row of pair (t, k)] over its kept pairs; backward: a weighted gather and
    row-wise dot products."""

    @staticmethod
    def forward(ctx, ys: torch.Tensor, plan: PermutePlan, weights: torch.Tensor) -> torch.Tensor:
        # ys: [N*K, D]  weights: [N, K]  ->  [N, D]
        if weights.dim() != 2:
            raise ValueError(f"weights must be [N, K], got shape {tuple(weights.shape)}")
        positions = launch_invert(plan.order)
        out = launch_combine(ys, positions, plan.offsets[-1:], weights.shape[1], weights)
        ctx.save_for_backward(ys, weights, positions, *plan)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ys, weights, positions, *saved = ctx.saved_tensors
        plan = PermutePlan(*saved)
        grad_ys = launch_gather(grad, plan, weights) if ctx.needs_input_grad[0] else None
        grad_weights = (launch_weight_grad(grad, ys, positions, plan.offsets[-1:], weights.shape[1], weights.dtype)
                        if ctx.needs_input_grad[2] else None)
        return grad_ys, None, grad_weights


permute_plan = launch_plan


def permute_plan_reference(expert_ids: torch.Tensor, n_experts: int) -> PermutePlan:
    """The plan from a stable argsort of the flattened expert ids (the dropped pairs' id, n_experts, sorts last)."""
    flat = expert_ids.flatten()
    order = flat.argsort(stable=True)
    ones = torch.ones_like(flat)
    counts = torch.zeros(n_experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(0, flat, ones)[:n_experts]
    return PermutePlan(order, order // expert_ids.shape[1], counts, counts.cumsum(0).to(torch.int32))


def gather(x: torch.Tensor, plan: PermutePlan) -> torch.Tensor:
    """x [N, D] -> [N*K, D], expert-major: row r is token plan.rows[r]; differentiable w.r.t. x."""
    return Gather.apply(x, plan)


def gather_reference(x: torch.Tensor, plan: PermutePlan) -> torch.Tensor:
    """x[plan.rows], zero past plan.offsets[-1] (the dropped pairs' rows)."""
    kept = torch.arange(len(plan.rows), device=x.device) < plan.offsets[-1]
    return torch.where(kept[:, None], x[plan.rows], 0)


def combine(ys: torch.Tensor, plan: PermutePlan, weights: torch.Tensor) -> torch.Tensor:
    """ys [N*K, D] -> [N, D]: each token's K rows times its routing weights [N, K], summed in slot order."""
    return Combine.apply(ys, plan, weights)


def combine_reference(ys: torch.Tensor, plan: PermutePlan, weights: torch.Tensor) -> torch.Tensor:
    """The same sum in PyTorch: slot by slot, in float32 (float64 for float64), cast back to ys.dtype; a dropped
    pair's row (past plan.offsets[-1]) is never read."""
    acc_dtype = torch.float64 if ys.dtype == torch.float64 else torch.float32
    positions = plan.order.argsort().view(weights.shape)  # the permuted row of each (token, slot) pair
    kept = positions < plan.offsets[-1]
    out = torch.zeros(weights.shape[0], ys.shape[1], dtype=acc_dtype, device=ys.device)
    for slot in range(weights.shape[1]):
        rows = torch.where(kept[:, slot, None], ys[positions[:, slot]], 0)
        out = out + rows.to(acc_dtype) * weights[:, slot, None].to(acc_dtype)
    return out.to(ys.dtype)

