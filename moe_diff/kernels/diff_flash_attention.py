"""Differential flash attention in Triton: one kernel family for the standard, diff and diff_v2 modes.

A program takes a block of queries of one head and streams each K/V block of its kv group once, keeping two
online softmaxes side by side (q1 k1 and q2 k2, over the same values), and finishes with
O1 / l1 - lam * O2 / l2; standard attention is the same kernel with one softmax. The maps are never stored:
the forward saves the two log-sum-exps (and O2, for the lambda gradient) and the backward recomputes them,
as FlashAttention does. The references are in diff_attention.py; the mode wrappers at the bottom take the
same arguments as theirs.

Which keys a query sees: by the rule, query i, which is key a = Tk - Tq + i (the queries are the last of the keys;
a = i except under context parallelism, whose variant OFFSET_QUERIES compiles), sees keys key_start[b, i] <= j <= a
of its own document, where key_start folds the sliding window and the earliest start of a document at or after query i
into one lower bound per query that never decreases along a row, so key blocks outside it are skipped and a window's
cost is linear in length. Documents are compared by name (the index of each one's first token), so a document may
continue after others, as an attention_mask with a hole makes it; where documents are contiguous runs the bound is
each query's own document start, so every block of an earlier document is skipped. Or by an explicit boolean mask
[B, Tq, Tk] (queries against a KV cache), when every key block is visited.
"""

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch

from moe_diff.errors import UsageError
from moe_diff.kernels.mask import AttentionMask
from moe_diff.kernels.triton_compat import HAVE_TRITON, tl, triton

LOG2E = 1.4426950408889634
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _allowed(offs_m, offs_n, key_start, document_row, mask_row, n_queries, n_keys, stride_mask_q,
             HAS_MASK: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, OFFSET_QUERIES: tl.constexpr):
    """[BLOCK_M, BLOCK_N] True where query offs_m may attend to key offs_n."""
    inside = (offs_m[:, None] < n_queries) & (offs_n[None, :] < n_keys)
    if HAS_MASK:
        explicit = tl.load(mask_row + offs_m[:, None] * stride_mask_q + offs_n[None, :], mask=inside, other=0)
        allowed = inside & (explicit != 0)
    else:
        shift = _query_shift(n_queries, n_keys, OFFSET_QUERIES)
        allowed = inside & (offs_n[None, :] - shift <= offs_m[:, None]) & (offs_n[None, :] >= key_start[:, None])
        if HAS_DOCUMENTS:
            query_document = tl.load(document_row + shift + offs_m, mask=offs_m < n_queries, other=-1)
            key_document = tl.load(document_row + offs_n, mask=offs_n < n_keys, other=-2)
            allowed = allowed & (query_document[:, None] == key_document[None, :])
    return allowed


@triton.jit
def _query_shift(n_queries, n_keys, OFFSET_QUERIES: tl.constexpr):
    """How far the queries' key indices lie past their own (query i is key i + shift): Tk - Tq, or a constant 0
    where the queries are all the keys, so that the common case compiles to the same code as without an offset."""
    if OFFSET_QUERIES:
        return n_keys - n_queries
    return 0


@triton.jit
def _key_range(key_start_row, start_m, n_queries, n_keys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               HAS_MASK: tl.constexpr, OFFSET_QUERIES: tl.constexpr):
    """The key blocks a query block must visit: all with an explicit mask, else from the first query's lower
    bound (key_start never decreases along a row) to the last query's key index."""
    if HAS_MASK:
        lo, hi = 0, n_keys
    else:
        lo = (tl.load(key_start_row + start_m) // BLOCK_N) * BLOCK_N
        hi = tl.minimum(start_m + BLOCK_M + _query_shift(n_queries, n_keys, OFFSET_QUERIES), n_keys)
    return lo, hi


@triton.jit
def _online_softmax_step(q, k_ptrs, k_mask, v, allowed, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One K/V block of one softmax: scores, running max and sum rescaled, values accumulated (base 2)."""
    k = tl.load(k_ptrs, mask=k_mask, other=0.0)  # [BLOCK_D, BLOCK_N]
    s = (tl.dot(q, k, input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)  # a compiled caller passes fp64
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
    alpha = tl.math.exp2(m_i - m_safe)
    p = tl.math.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# q1, q2: [B, Tq, H, d]  k1, k2: [B, Tk, G, d]  v: [B, Tk, G, dv]  lam: [B, Tq, H] (any strides)
# key_start: [B, Tq] int32  documents (each key's document start): [B, Tk] int32  mask: [B, Tq, Tk]
# ->  out: [B, Tq, H, dv]  o2: [B, Tq, H, dv] fp32  lse: [2, B, H, Tq]
@triton.jit
def _forward_kernel(Q1, Q2, K1, K2, V, LAM, KEY_START, DOCUMENTS, MASK, OUT, O2, LSE,
                    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                    stride_vb, stride_vt, stride_vh, stride_lb, stride_lt, stride_lh,
                    stride_ob, stride_ot, stride_oh, stride_mb, stride_mq,
                    n_queries, n_keys, n_heads, group_size, qk_scale, length_bucket,
                    HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr, SHARED_K: tl.constexpr,
                    HAS_MASK: tl.constexpr, HAS_DOCUMENTS: tl.constexpr, OFFSET_QUERIES: tl.constexpr,
                    STORE_O2: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, VALUE_SPLITS: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    batch, head = (tl.program_id(1) // n_heads).to(tl.int64), tl.program_id(1) % n_heads  # 64-bit offsets
    group = head // group_size
    offs_m = start_m + tl.arange(0, BLOCK_M)
    # with VALUE_SPLITS programs per query block, each takes its part of the value columns (fewer accumulator
    # registers) and recomputes the scores
    tl.static_assert(VALUE_DIM % VALUE_SPLITS == 0, "the values must split evenly")
    PART: tl.constexpr = VALUE_DIM // VALUE_SPLITS
    split = tl.program_id(2)
    offs_d, offs_part = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV // VALUE_SPLITS)
    offs_dv = split * PART + offs_part
    q_offsets = batch * stride_qb + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q_mask = (offs_m[:, None] < n_queries) & (offs_d[None, :] < HEAD_DIM)
    q1 = tl.load(Q1 + q_offsets, mask=q_mask, other=0.0)
    key_start = tl.load(KEY_START + batch * n_queries + offs_m, mask=offs_m < n_queries, other=0)
    document_row, mask_row = DOCUMENTS + batch * n_keys, MASK + batch * stride_mb
    m1 = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l1 = tl.zeros([BLOCK_M], tl.float32)
    acc1 = tl.zeros([BLOCK_M, BLOCK_DV // VALUE_SPLITS], tl.float32)
    if TWO:
        q2 = tl.load(Q2 + q_offsets, mask=q_mask, other=0.0)
        m2 = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l2 = tl.zeros([BLOCK_M], tl.float32)
        acc2 = tl.zeros([BLOCK_M, BLOCK_DV // VALUE_SPLITS], tl.float32)
    lo, hi = _key_range(KEY_START + batch * n_queries, start_m, n_queries, n_keys, BLOCK_M, BLOCK_N, HAS_MASK,
                        OFFSET_QUERIES)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        allowed = _allowed(offs_m, offs_n, key_start, document_row, mask_row, n_queries, n_keys, stride_mq, HAS_MASK,
                           HAS_DOCUMENTS, OFFSET_QUERIES)
        k_offsets = batch * stride_kb + offs_n[None, :] * stride_kt + group * stride_kh + offs_d[:, None]
        k_mask = (offs_n[None, :] < n_keys) & (offs_d[:, None] < HEAD_DIM)
        v_offsets = batch * stride_vb + offs_n[:, None] * stride_vt + group * stride_vh + offs_dv[None, :]
        v = tl.load(V + v_offsets, mask=(offs_n[:, None] < n_keys) & (offs_part[None, :] < PART), other=0.0)
        m1, l1, acc1 = _online_softmax_step(q1, K1 + k_offsets, k_mask, v, allowed, m1, l1, acc1, qk_scale,
                                            DOT_PRECISION)
        if TWO:  # diff_v2 (SHARED_K): the pair's second load of its group's keys hits the cache
            m2, l2, acc2 = _online_softmax_step(q2, (K1 if SHARED_K else K2) + k_offsets, k_mask, v, allowed,
                                                m2, l2, acc2, qk_scale, DOT_PRECISION)
    rows = offs_m < n_queries
    lse_offsets = (batch * n_heads + head) * n_queries + offs_m
    l1 = tl.where(l1 == 0.0, 1.0, l1)  # rows past the end, or that see no key, give 0 (never read back)
    out = acc1 / l1[:, None]
    if split == 0:  # the splits' log-sum-exps are equal
        tl.store(LSE + lse_offsets, m1 + tl.math.log2(l1), mask=rows)
    o_offsets = batch * stride_ob + offs_m[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
    o_mask = rows[:, None] & (offs_part[None, :] < PART)
    if TWO:
        l2 = tl.where(l2 == 0.0, 1.0, l2)
        o2 = acc2 / l2[:, None]
        if split == 0:
            tl.store(LSE + tl.num_programs(1) * n_queries + lse_offsets, m2 + tl.math.log2(l2), mask=rows)
        lam = tl.load(LAM + batch * stride_lb + offs_m * stride_lt + head * stride_lh, mask=rows, other=0.0)
        out = out - lam.to(tl.float32)[:, None] * o2
        if STORE_O2:
            tl.store(O2 + o_offsets, o2, mask=o_mask)
    tl.store(OUT + o_offsets, out.to(OUT.dtype.element_ty), mask=o_mask)


# Backward, dK and dV: one program per key block and kv group, looping over the group's heads and the query
# blocks that can see it, so nothing is accumulated across programs (no atomics; results repeat bit for bit).
# delta: [2, B, H, Tq] fp32 = rowsum(dO * O1), rowsum(dO * O2)  query_stop: [B, Tk] int32, one past the last
# query that may see key j  ->  dk1, dk2: [B, Tk, G, d]  dv: [B, Tk, G, dv]
@triton.jit
def _backward_kv_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE, DELTA, KEY_START, QUERY_STOP, DOCUMENTS, MASK,
                        DK1, DK2, DV,
                        stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                        stride_vb, stride_vt, stride_vh, stride_lb, stride_lt, stride_lh,
                        stride_ob, stride_ot, stride_oh, stride_mb, stride_mq,
                        n_queries, n_keys, n_heads, n_groups, group_size, qk_scale, sm_scale, length_bucket,
                        HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                        BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr,
                        SHARED_K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                        OFFSET_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_n = tl.program_id(0) * BLOCK_N
    batch, group = (tl.program_id(1) // n_groups).to(tl.int64), tl.program_id(1) % n_groups
    plane = tl.num_programs(1) // n_groups * n_heads * n_queries  # B * H * Tq: the second softmax's offset
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    k_offsets = batch * stride_kb + offs_n[:, None] * stride_kt + group * stride_kh + offs_d[None, :]
    k_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM)
    v_offsets = batch * stride_vb + offs_n[:, None] * stride_vt + group * stride_vh + offs_dv[None, :]
    v_mask = (offs_n[:, None] < n_keys) & (offs_dv[None, :] < VALUE_DIM)
    k1 = tl.load(K1 + k_offsets, mask=k_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
    v = tl.load(V + v_offsets, mask=v_mask, other=0.0)  # [BLOCK_N, BLOCK_DV]
    dk1 = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if TWO:
        k2 = k1
        if not SHARED_K:
            k2 = tl.load(K2 + k_offsets, mask=k_mask, other=0.0)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if HAS_MASK:
        lo_m, hi_m = 0, n_queries
    else:
        lo_m = (tl.maximum(start_n - _query_shift(n_queries, n_keys, OFFSET_QUERIES), 0) // BLOCK_M) * BLOCK_M
        hi_m = tl.load(QUERY_STOP + batch * n_keys + tl.minimum(start_n + BLOCK_N, n_keys) - 1)
    document_row, mask_row = DOCUMENTS + batch * n_keys, MASK + batch * stride_mb
    for head in range(group * group_size, group * group_size + group_size):
        for start_m in range(lo_m, hi_m, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            rows = offs_m < n_queries
            key_start = tl.load(KEY_START + batch * n_queries + offs_m, mask=rows, other=0)
            allowed = _allowed(offs_m, offs_n, key_start, document_row, mask_row, n_queries, n_keys, stride_mq,
                               HAS_MASK, HAS_DOCUMENTS, OFFSET_QUERIES)
            q_offsets = batch * stride_qb + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
            q_mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
            do_offsets = batch * stride_ob + offs_m[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
            do = tl.load(DO + do_offsets, mask=rows[:, None] & (offs_dv[None, :] < VALUE_DIM), other=0.0)
            row_offsets = (batch * n_heads + head) * n_queries + offs_m
            q1 = tl.load(Q1 + q_offsets, mask=q_mask, other=0.0)
            p1 = (tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)
            p1 = tl.where(allowed, tl.math.exp2(p1 - tl.load(LSE + row_offsets, mask=rows, other=0.0)[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)  # [BLOCK_M, BLOCK_N], both maps' dP
            ds1 = p1 * (dp - tl.load(DELTA + row_offsets, mask=rows, other=0.0)[:, None])
            dk1 += tl.dot(tl.trans(ds1.to(q1.dtype)), q1, input_precision=DOT_PRECISION)
            p_v = p1
            if TWO:
                q2 = tl.load(Q2 + q_offsets, mask=q_mask, other=0.0)
                lam = tl.load(LAM + batch * stride_lb + offs_m * stride_lt + head * stride_lh, mask=rows, other=0.0)
                lam = lam.to(tl.float32)[:, None]
                p2 = (tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)
                lse2 = tl.load(LSE + plane + row_offsets, mask=rows, other=0.0)
                p2 = tl.where(allowed, tl.math.exp2(p2 - lse2[:, None]), 0.0)
                ds2 = -lam * p2 * (dp - tl.load(DELTA + plane + row_offsets, mask=rows, other=0.0)[:, None])
                if SHARED_K:
                    dk1 += tl.dot(tl.trans(ds2.to(q2.dtype)), q2, input_precision=DOT_PRECISION)
                else:
                    dk2 += tl.dot(tl.trans(ds2.to(q2.dtype)), q2, input_precision=DOT_PRECISION)
                p_v = p1 - lam * p2
            dv += tl.dot(tl.trans(p_v.to(do.dtype)), do, input_precision=DOT_PRECISION)
    # the gradients are contiguous [B, Tk, G, d] and [B, Tk, G, dv]
    dk_offsets = ((batch * n_keys + offs_n[:, None]) * n_groups + group) * HEAD_DIM + offs_d[None, :]
    tl.store(DK1 + dk_offsets, (dk1 * sm_scale).to(DK1.dtype.element_ty), mask=k_mask)
    if TWO and not SHARED_K:
        tl.store(DK2 + dk_offsets, (dk2 * sm_scale).to(DK2.dtype.element_ty), mask=k_mask)
    dv_offsets = ((batch * n_keys + offs_n[:, None]) * n_groups + group) * VALUE_DIM + offs_dv[None, :]
    tl.store(DV + dv_offsets, dv.to(DV.dtype.element_ty), mask=v_mask)


# Backward, dQ: one program per query block and head, over the same key blocks as the forward.
# -> dq1, dq2: [B, Tq, H, d]
@triton.jit
def _backward_q_kernel(Q1, Q2, K1, K2, V, LAM, DO, LSE, DELTA, KEY_START, DOCUMENTS, MASK, DQ1, DQ2,
                       stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
                       stride_vb, stride_vt, stride_vh, stride_lb, stride_lt, stride_lh,
                       stride_ob, stride_ot, stride_oh, stride_mb, stride_mq,
                       n_queries, n_keys, n_heads, group_size, qk_scale, sm_scale, length_bucket,
                       HEAD_DIM: tl.constexpr, VALUE_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TWO: tl.constexpr,
                       SHARED_K: tl.constexpr, HAS_MASK: tl.constexpr, HAS_DOCUMENTS: tl.constexpr,
                       OFFSET_QUERIES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    batch, head = (tl.program_id(1) // n_heads).to(tl.int64), tl.program_id(1) % n_heads
    group = head // group_size
    plane = tl.num_programs(1) * n_queries
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d, offs_dv = tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_DV)
    rows = offs_m < n_queries
    q_offsets = batch * stride_qb + offs_m[:, None] * stride_qt + head * stride_qh + offs_d[None, :]
    q_mask = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    row_offsets = (batch * n_heads + head) * n_queries + offs_m
    q1 = tl.load(Q1 + q_offsets, mask=q_mask, other=0.0)
    do_offsets = batch * stride_ob + offs_m[:, None] * stride_ot + head * stride_oh + offs_dv[None, :]
    do = tl.load(DO + do_offsets, mask=rows[:, None] & (offs_dv[None, :] < VALUE_DIM), other=0.0)
    lse1 = tl.load(LSE + row_offsets, mask=rows, other=0.0)
    delta1 = tl.load(DELTA + row_offsets, mask=rows, other=0.0)
    dq1 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    if TWO:
        q2 = tl.load(Q2 + q_offsets, mask=q_mask, other=0.0)
        lse2 = tl.load(LSE + plane + row_offsets, mask=rows, other=0.0)
        delta2 = tl.load(DELTA + plane + row_offsets, mask=rows, other=0.0)
        lam = tl.load(LAM + batch * stride_lb + offs_m * stride_lt + head * stride_lh, mask=rows, other=0.0)
        lam = lam.to(tl.float32)[:, None]
        dq2 = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    key_start = tl.load(KEY_START + batch * n_queries + offs_m, mask=rows, other=0)
    document_row, mask_row = DOCUMENTS + batch * n_keys, MASK + batch * stride_mb
    lo, hi = _key_range(KEY_START + batch * n_queries, start_m, n_queries, n_keys, BLOCK_M, BLOCK_N, HAS_MASK,
                        OFFSET_QUERIES)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        allowed = _allowed(offs_m, offs_n, key_start, document_row, mask_row, n_queries, n_keys, stride_mq, HAS_MASK,
                           HAS_DOCUMENTS, OFFSET_QUERIES)
        k_offsets = batch * stride_kb + offs_n[:, None] * stride_kt + group * stride_kh + offs_d[None, :]
        k_mask = (offs_n[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM)
        v_offsets = batch * stride_vb + offs_n[:, None] * stride_vt + group * stride_vh + offs_dv[None, :]
        v = tl.load(V + v_offsets, mask=(offs_n[:, None] < n_keys) & (offs_dv[None, :] < VALUE_DIM), other=0.0)
        k1 = tl.load(K1 + k_offsets, mask=k_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        p1 = (tl.dot(q1, tl.trans(k1), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)
        p1 = tl.where(allowed, tl.math.exp2(p1 - lse1[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds1 = p1 * (dp - delta1[:, None])
        dq1 += tl.dot(ds1.to(k1.dtype), k1, input_precision=DOT_PRECISION)
        if TWO:
            k2 = k1
            if not SHARED_K:
                k2 = tl.load(K2 + k_offsets, mask=k_mask, other=0.0)
            p2 = (tl.dot(q2, tl.trans(k2), input_precision=DOT_PRECISION) * qk_scale).to(tl.float32)
            p2 = tl.where(allowed, tl.math.exp2(p2 - lse2[:, None]), 0.0)
            ds2 = -lam * p2 * (dp - delta2[:, None])
            dq2 += tl.dot(ds2.to(k2.dtype), k2, input_precision=DOT_PRECISION)
    dq_offsets = ((batch * n_queries + offs_m[:, None]) * n_heads + head) * HEAD_DIM + offs_d[None, :]  # contiguous
    tl.store(DQ1 + dq_offsets, (dq1 * sm_scale).to(DQ1.dtype.element_ty), mask=q_mask)
    if TWO:
        tl.store(DQ2 + dq_offsets, (dq2 * sm_scale).to(DQ2.dtype.element_ty), mask=q_mask)


KERNELS = {"forward": _forward_kernel, "backward_kv": _backward_kv_kernel, "backward_q": _backward_q_kernel}
MODES = ("standard", "diff", "diff_v2")  # one softmax; two with their own keys; two sharing one group's keys
LaunchParams = tuple[int, ...]  # BLOCK_M, BLOCK_N, num_warps, num_stages[, VALUE_SPLITS: the forward kernel's, or 1]
# The launches a GPU chooses from, per kernel, mode and value width (up to 128, or wider): first the one picked by
# hand on an H100, then up to three more that the Hopper compile check (benchmarks/attention_blocks.py,
# python -m moe_diff.kernels.gpu_compile) shows spilling at most 64 bytes per thread, within 227 KB of shared
# memory and on warpgroup MMAs, largest tiles first: at head_dim 128 for standard and diff_v2 (values 128 wide)
# and for diff's wide values (256), at head_dim 64 for diff's narrow ones (128). diff's forward at 256-wide values
# may also split them over two programs per query block (a fifth number, VALUE_SPLITS: each keeps two d-wide
# accumulators and recomputes the scores), which cuts its spills from 216 to 8 bytes per thread at 64 x 64. On a
# GPU, Triton times them on first use for each AUTOTUNE_KEY and dtype and keeps the fastest (on disk too, where
# its version can); under the interpreter INTERPRETER_BLOCKS alone runs.
CANDIDATES: dict[tuple[str, str, bool], tuple[LaunchParams, ...]] = {
    ("forward", "standard", False): ((128, 64, 8, 3), (64, 64, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2)),
    ("forward", "diff", False): ((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 2), (64, 64, 8, 2)),
    ("forward", "diff_v2", False): ((128, 64, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2)),
    ("backward_kv", "standard", False): ((64, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 2)),
    ("backward_kv", "diff", False): ((64, 64, 8, 2), (32, 64, 8, 2), (128, 32, 8, 2)),
    ("backward_kv", "diff_v2", False): ((64, 64, 8, 2), (32, 64, 8, 2), (32, 128, 8, 2), (128, 32, 8, 3)),
    ("backward_q", "standard", False): ((64, 64, 8, 2), (64, 32, 8, 2), (128, 128, 8, 2), (64, 128, 8, 2)),
    ("backward_q", "diff", False): ((64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2)),
    ("backward_q", "diff_v2", False): ((64, 64, 8, 2), (64, 32, 8, 2), (128, 64, 8, 3), (128, 32, 8, 2)),
    ("forward", "diff", True): ((64, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2, 2), (128, 32, 8, 2, 2)),
    ("backward_kv", "diff", True): ((32, 64, 8, 2), (16, 64, 8, 2), (16, 64, 8, 3)),
    ("backward_q", "diff", True): ((64, 32, 8, 2), (128, 32, 8, 2), (64, 32, 8, 3)),
    # values wider than 128 in the other modes (head_dim over 128): the hand-picked wide launches alone
    ("forward", "standard", True): ((64, 64, 8, 2),), ("forward", "diff_v2", True): ((64, 64, 8, 2),),
    ("backward_kv", "standard", True): ((32, 64, 8, 2),), ("backward_kv", "diff_v2", True): ((32, 64, 8, 2),),
    ("backward_q", "standard", True): ((64, 32, 8, 2),), ("backward_q", "diff_v2", True): ((64, 32, 8, 2),),
}
# each mode has its candidates
AUTOTUNE_KEY = ["HEAD_DIM", "VALUE_DIM", "HAS_MASK", "HAS_DOCUMENTS", "OFFSET_QUERIES", "length_bucket"]
INTERPRETER_BLOCKS = (16, 16, 1, 1)  # small blocks keep the interpreted tests quick


def launch_constants(kernel: str, launch: LaunchParams) -> dict[str, int]:
    """The kernel's block constants of a launch: BLOCK_M and BLOCK_N, and the forward kernel's VALUE_SPLITS."""
    constants = {"BLOCK_M": launch[0], "BLOCK_N": launch[1]}
    if kernel == "forward":
        constants["VALUE_SPLITS"] = launch[4] if len(launch) > 4 else 1
    return constants


def length_bucket(n_queries: int, n_keys: int) -> int:
    """The power of two at or above the longer of the two lengths (at least 1024): one tuning per bucket."""
    return max(1024, triton.next_power_of_2(max(n_queries, n_keys)))


def tuned(kernel: str, candidates: tuple[LaunchParams, ...]) -> "triton.runtime.Autotuner":
    """`kernel` autotuned over `candidates`, per AUTOTUNE_KEY and the inputs' dtypes."""
    configs = [triton.Config(launch_constants(kernel, launch), num_warps=launch[2], num_stages=launch[3])
               for launch in candidates]
    on_disk = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY, **on_disk)(KERNELS[kernel])


# built here, not at the first launch: torch.compile traces through a launch but not through making an autotuner
TUNED = {key: tuned(key[0], candidates) for key, candidates in CANDIDATES.items()} \
    if HAVE_TRITON and os.environ.get("TRITON_INTERPRET") != "1" else {}


def launch_kernel(kernel: str, launch: "Launch", grid: Callable[[dict], tuple[int, ...]], device: torch.device,
                  *args: Any, **kwargs: Any) -> None:
    """Run `kernel` for this launch's mode and value width: autotuned over its candidates on a GPU, with
    INTERPRETER_BLOCKS elsewhere; `grid` maps the chosen constants to the program grid."""
    if device.type == "cuda":
        TUNED[kernel, launch.mode, launch.wide_values][grid](*args, **kwargs)
        return
    KERNELS[kernel][grid](*args, **launch_constants(kernel, INTERPRETER_BLOCKS), num_warps=INTERPRETER_BLOCKS[2],
                          num_stages=INTERPRETER_BLOCKS[3], **kwargs)


def rule_bounds(n_queries: int, n_keys: int, batch: int, window: int | None, document_starts: torch.Tensor | None,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """key_start [B, Tq] (query i, key a = Tk - Tq + i, sees keys key_start[i] <= j <= a of its document) and
    query_stop [B, Tk] (key j is seen by no query after query_stop[j] - 1), both int32 and never decreasing along a
    row, from the window and where each key's document begins (AttentionMask.document_starts)."""
    keys = torch.arange(n_keys, device=device)
    at = keys[n_keys - n_queries:]
    start = (at - window + 1).clamp(min=0) if window is not None else torch.zeros_like(at)
    start = start.expand(batch, n_queries)
    if document_starts is not None:
        # the earliest document start from query i on: i's own where documents are contiguous runs, and never
        # after it, so with the kernels' comparison of documents the bound stays exact
        earliest = document_starts.flip(1).cummin(dim=1).values.flip(1)
        start = torch.maximum(start, earliest[:, n_keys - n_queries:])
    key_start = start.to(torch.int32).contiguous()
    query_stop = torch.searchsorted(key_start, keys.to(torch.int32).expand(batch, n_keys).contiguous(), right=True)
    return key_start, query_stop.to(torch.int32)


def _rows_contiguous(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Views as they are when their last dimension is contiguous and they share strides (q1/q2, k1/k2), else
    contiguous copies."""
    present = [t for t in tensors if t is not None]
    if all(t.stride(-1) == 1 and t.stride() == present[0].stride() for t in present):
        return list(tensors)
    return [None if t is None else t.contiguous() for t in tensors]


class Launch:
    """Shapes, strides and flags shared by the three kernels of one attention call."""

    def __init__(self, q1: torch.Tensor, q2: torch.Tensor | None, k1: torch.Tensor, k2: torch.Tensor | None,
                 v: torch.Tensor, lam: torch.Tensor | None, mask: torch.Tensor | None,
                 documents: torch.Tensor | None = None):
        self.batch, self.n_queries, self.n_heads, self.head_dim = q1.shape
        self.n_keys, self.n_groups, self.value_dim = k1.shape[1], k1.shape[2], v.shape[-1]
        self.group_size = self.n_heads // self.n_groups
        self.two, self.shared_k, self.has_mask = q2 is not None, q2 is not None and k2 is None, mask is not None
        self.mode = MODES[self.two + self.shared_k]
        self.sm_scale = self.head_dim ** -0.5
        self.length_bucket = length_bucket(self.n_queries, self.n_keys)
        self.wide_values = self.value_dim > 128  # which of the mode's two candidate lists applies
        precision = "ieee" if q1.dtype == torch.float32 else "tf32"  # float32 inputs stay exact on a GPU
        lam_strides = lam.stride() if lam is not None else (0, 0, 0)
        mask_strides = mask.stride()[:2] if mask is not None else (0, 0)
        self.strides = (*q1.stride()[:3], *k1.stride()[:3], *v.stride()[:3], *lam_strides)
        self.out_and_mask_strides = (self.n_queries * self.n_heads * self.value_dim, self.n_heads * self.value_dim,
                                     self.value_dim, *mask_strides)
        self.constants = dict(HEAD_DIM=self.head_dim, VALUE_DIM=self.value_dim,
                              BLOCK_D=max(16, triton.next_power_of_2(self.head_dim)),
                              BLOCK_DV=max(16, triton.next_power_of_2(self.value_dim)), TWO=self.two,
                              SHARED_K=self.shared_k, HAS_MASK=self.has_mask,
                              HAS_DOCUMENTS=documents is not None,
                              OFFSET_QUERIES=not self.has_mask and self.n_queries != self.n_keys,
                              DOT_PRECISION=precision)


def _forward(q1, q2, k1, k2, v, lam, key_start, documents, mask, store_o2: bool):
    launch = Launch(q1, q2, k1, k2, v, lam, mask, documents)
    shape = (launch.batch, launch.n_queries, launch.n_heads, launch.value_dim)
    out = torch.empty(shape, dtype=q1.dtype, device=q1.device)
    o2 = torch.empty(shape, dtype=torch.float32, device=q1.device) if launch.two and store_o2 else None
    lse = torch.empty(2 if launch.two else 1, launch.batch, launch.n_heads, launch.n_queries, dtype=torch.float32,
                      device=q1.device)

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(launch.n_queries, meta["BLOCK_M"]), launch.batch * launch.n_heads, meta["VALUE_SPLITS"]

    launch_kernel("forward", launch, grid, q1.device, q1, q2 if launch.two else q1, k1,
                  k2 if k2 is not None else k1, v, lam if lam is not None else lse, key_start,
                  documents if documents is not None else key_start, mask if mask is not None else key_start, out,
                  o2 if o2 is not None else out, lse, *launch.strides,
                  *launch.out_and_mask_strides, launch.n_queries, launch.n_keys, launch.n_heads, launch.group_size,
                  launch.sm_scale * LOG2E, launch.length_bucket, STORE_O2=o2 is not None, **launch.constants)
    return out, o2, lse


def _backward(grad_out, q1, q2, k1, k2, v, lam, key_start, query_stop, documents, mask, out, o2, lse):
    launch = Launch(q1, q2, k1, k2, v, lam, mask, documents)
    grad_out = grad_out.contiguous()
    grad_float = grad_out.float()
    grad_lam = None
    if launch.two:
        o1 = out.float() + lam[..., None].float() * o2
        delta = torch.stack([(grad_float * o1).sum(-1), (grad_float * o2).sum(-1)])  # [2, B, Tq, H]
        grad_lam = (-delta[1]).to(lam.dtype)
    else:
        delta = (grad_float * out.float()).sum(-1)[None]
    delta = delta.transpose(2, 3).contiguous()  # [2 or 1, B, H, Tq], like lse
    dq1, dk1, dv = torch.empty_like(q1, memory_format=torch.contiguous_format), \
        torch.empty_like(k1, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)
    dq2 = torch.empty_like(dq1) if launch.two else None
    dk2 = torch.empty_like(dk1) if launch.two and not launch.shared_k else None
    q2_, k2_ = (q2 if launch.two else q1), (k2 if k2 is not None else k1)
    lam_, mask_ = (lam if lam is not None else lse), (mask if mask is not None else key_start)
    documents_ = documents if documents is not None else key_start
    scales = (launch.sm_scale * LOG2E, launch.sm_scale)

    def key_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(launch.n_keys, meta["BLOCK_N"]), launch.batch * launch.n_groups

    def query_grid(meta: dict) -> tuple[int, int]:
        return triton.cdiv(launch.n_queries, meta["BLOCK_M"]), launch.batch * launch.n_heads

    launch_kernel("backward_kv", launch, key_grid, q1.device, q1, q2_, k1, k2_, v, lam_, grad_out, lse, delta,
                  key_start, query_stop, documents_, mask_, dk1, dk2 if dk2 is not None else dk1, dv, *launch.strides,
                  *launch.out_and_mask_strides, launch.n_queries, launch.n_keys, launch.n_heads, launch.n_groups,
                  launch.group_size, *scales, launch.length_bucket, **launch.constants)
    launch_kernel("backward_q", launch, query_grid, q1.device, q1, q2_, k1, k2_, v, lam_, grad_out, lse, delta,
                  key_start, documents_, mask_, dq1, dq2 if dq2 is not None else dq1, *launch.strides,
                  *launch.out_and_mask_strides, launch.n_queries, launch.n_keys, launch.n_heads, launch.group_size,
                  *scales, launch.length_bucket, **launch.constants)
    return dq1, dq2, dk1, dk2, dv, grad_lam


class FlashAttention(torch.autograd.Function):
    """out = softmax(q1 k1^T) v - lam * softmax(q2 k2^T) v (or one softmax when q2 is None; k2 None: k1 for both)."""

    @staticmethod
    def forward(ctx, q1, q2, k1, k2, v, lam, key_start, query_stop, documents, mask):
        out, o2, lse = _forward(q1, q2, k1, k2, v, lam, key_start, documents, mask,
                                store_o2=any(ctx.needs_input_grad))
        ctx.save_for_backward(q1, q2, k1, k2, v, lam, key_start, query_stop, documents, mask, out, o2, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return (*_backward(grad_out, *ctx.saved_tensors), None, None, None, None)


def _bounds(mask: AttentionMask, batch: int, n_queries: int, n_keys: int, device: torch.device
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """key_start, query_stop, the documents (each key's document start, int32) and the explicit mask the kernels
    take, built once per forward."""
    if mask.explicit is not None:
        key_start = torch.zeros(batch, n_queries, dtype=torch.int32, device=device)
        return key_start, key_start, None, mask.explicit.contiguous()
    if n_queries > n_keys:
        raise ValueError(f"{n_queries} queries against {n_keys} keys need an explicit mask (the rule's queries are the "
                         "last of its keys)")
    starts = mask.document_starts() if mask.document_ids is not None else None
    documents = starts.to(torch.int32).contiguous() if starts is not None else None
    return *rule_bounds(n_queries, n_keys, batch, mask.window, starts, device), documents, None


def _attend(q1, q2, k1, k2, v, lam, mask: AttentionMask) -> torch.Tensor:
    """Checks, then the rule's bounds (or the explicit mask), then the kernels."""
    if q1.dtype not in DTYPES[:3] or k1.dtype != q1.dtype or v.dtype != q1.dtype:
        raise UsageError(f"attn_backend='triton' runs float32, bfloat16 or float16 (q, k and v alike), got "
                         f"{q1.dtype}, {k1.dtype} and {v.dtype}; use the reference backend for float64")
    if not q1.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise UsageError("attn_backend='triton' runs on CUDA tensors (on the CPU only under TRITON_INTERPRET=1, for "
                         "tests); use 'sdpa' or 'auto' on the CPU")
    batch, n_queries, n_heads, _ = q1.shape
    if n_heads % k1.shape[2]:
        raise ValueError(f"{n_heads} query heads cannot share {k1.shape[2]} kv groups evenly")
    q1, q2 = _rows_contiguous(q1, q2)
    k1, k2 = _rows_contiguous(k1, k2)
    (v,) = _rows_contiguous(v)
    key_start, query_stop, documents, explicit = mask.form(
        ("triton", batch, n_queries, k1.shape[1], q1.device),
        lambda: _bounds(mask, batch, n_queries, k1.shape[1], q1.device))
    return FlashAttention.apply(q1, q2, k1, k2, v, lam, key_start, query_stop, documents, explicit)


def attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Standard attention. q: [B, Tq, Hq, d], k, v: [B, Tk, Hk, d] -> [B, Tq, Hq, d]."""
    return _attend(q, None, k, None, v, None, mask)


def diff_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                          mask: AttentionMask) -> torch.Tensor:
    """(A1 - lam * A2) v. q: [B, T, H, 2, d], k: [B, T, G, 2, d], v: [B, T, G, 2d], lam: 0-dim -> [B, T, H, 2d]."""
    lam_rows = lam.expand(*q.shape[:3])  # a stride-0 view: its gradient sums back to the one lambda
    return _attend(q[..., 0, :], q[..., 1, :], k[..., 0, :], k[..., 1, :], v, lam_rows, mask)


def diff_v2_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                             mask: AttentionMask) -> torch.Tensor:
    """attn(q_2h) - lam[..., h] * attn(q_2h+1), the pair in one program over its group's keys.
    q: [B, T, 2H, d], k, v: [B, T, Hk, d], lam: [B, T, H] -> [B, T, H, d]."""
    return _attend(q[:, :, 0::2], q[:, :, 1::2], k, None, v, lam, mask)
