"""The experts of a decode step as two Triton launches: matrix-vector products that read each (token, slot) pair's
expert rows once, for steps with few pairs (a compiled decode step on a GPU), where a GEMM would pad each expert's
one or two rows out to a tile.

The first launch computes every pair's SwiGLU hidden row, silu(x w1[e]^T) * (x w3[e]^T), one program per pair and
block of ffn rows, reading its expert's w1 and w3 rows once; the second sums each token's K pairs' down projections
hidden w2[e]^T weighted by the routing weights, in slot order (no atomics, so results repeat bit for bit), one
program per token and block of output features. Float32 accumulation whatever the weights' dtype. A pair dropped
for capacity (expert id E) reads no weights and adds nothing. Inference only (no autograd). The reference is
moe_experts_reference in moe_experts.py; tests compare the two under Triton's interpreter.
"""

import torch

from moe_diff.kernels.triton_compat import tl, triton

# rows per program and columns per step of the reduction: on a GPU, wide loads of a few rows (an H200 keeps
# about a thousand programs in flight at Mixtral's 14336 ffn rows); under the interpreter, small blocks
GPU_BLOCKS = {"rows": 16, "columns": 256}
INTERPRETER_BLOCKS = {"rows": 16, "columns": 16}


# x: [N, D]  ids: [N*K]  w1, w3: [E, F, D]  ->  hidden: [N*K, F] float32 (0 for a dropped pair)
# one program per (pair, block of F rows)
@triton.jit
def _gate_up_kernel(x_ptr, ids_ptr, w1_ptr, w3_ptr, hidden_ptr, dim, ffn, top_k, n_experts,
                    BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    pair = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < ffn
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    read = rows < tl.where(expert < n_experts, ffn, 0)  # no weights read for a pair dropped for capacity
    token = pair // top_k
    matrix = expert * ffn * dim + rows[:, None].to(tl.int64) * dim  # the rows' starts in w1 and w3
    gate = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    up = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(0, dim, BLOCK_COLS):
        cols = start + tl.arange(0, BLOCK_COLS)
        col_mask = cols < dim
        x = tl.load(x_ptr + token * dim + cols, mask=col_mask, other=0.0).to(tl.float32)
        mask = read[:, None] & col_mask[None, :]
        gate += tl.sum(tl.load(w1_ptr + matrix + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], 1)
        up += tl.sum(tl.load(w3_ptr + matrix + cols[None, :], mask=mask, other=0.0).to(tl.float32) * x[None, :], 1)
    hidden = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(hidden_ptr + pair * ffn + rows, hidden, mask=row_mask)


# hidden: [N*K, F] float32  ids, weights: [N*K]  w2: [E, D, F]  ->  out: [N, D]
# one program per (token, block of D output features)
@triton.jit
def _down_combine_kernel(hidden_ptr, ids_ptr, weights_ptr, w2_ptr, out_ptr, dim, ffn, top_k, n_experts,
                         BLOCK_ROWS: tl.constexpr, BLOCK_COLS: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_mask = rows < dim
    total = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for slot in range(0, top_k):
        pair = token * top_k + slot
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        read = rows < tl.where(expert < n_experts, dim, 0)  # nothing read for a dropped pair
        matrix = expert * dim * ffn + rows[:, None].to(tl.int64) * ffn  # the rows' starts in w2
        part = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
        for start in range(0, ffn, BLOCK_COLS):
            cols = start + tl.arange(0, BLOCK_COLS)
            col_mask = cols < ffn
            hidden = tl.load(hidden_ptr + pair * ffn + cols, mask=col_mask, other=0.0)
            w = tl.load(w2_ptr + matrix + cols[None, :], mask=read[:, None] & col_mask[None, :], other=0.0)
            part += tl.sum(w.to(tl.float32) * hidden[None, :], 1)
        total += tl.load(weights_ptr + pair).to(tl.float32) * part
    tl.store(out_ptr + token * dim + rows, total.to(out_ptr.dtype.element_ty), mask=row_mask)


def moe_experts_gemv(x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                     w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    """The weighted sum of each token's top-k experts in two launches of matrix-vector products.

    x: [N, D], expert_ids and weights: [N, K], w1 and w3: [E, F, D], w2: [E, D, F] -> [N, D] in x's dtype.
    """
    n_tokens, top_k = expert_ids.shape
    ffn, dim = w1.shape[1], w1.shape[2]
    blocks = GPU_BLOCKS if x.is_cuda else INTERPRETER_BLOCKS
    ids, pair_weights = expert_ids.reshape(-1).contiguous(), weights.reshape(-1).contiguous()
    x, w1, w2, w3 = (t.contiguous() for t in (x, w1, w2, w3))
    hidden = torch.empty(n_tokens * top_k, ffn, dtype=torch.float32, device=x.device)
    out = torch.empty_like(x)
    constants = dict(BLOCK_ROWS=blocks["rows"], BLOCK_COLS=blocks["columns"])
    _gate_up_kernel[(n_tokens * top_k, triton.cdiv(ffn, blocks["rows"]))](
        x, ids, w1, w3, hidden, dim, ffn, top_k, w1.shape[0], **constants)
    _down_combine_kernel[(n_tokens, triton.cdiv(dim, blocks["rows"]))](
        hidden, ids, pair_weights, w2, out, dim, ffn, top_k, w1.shape[0], **constants)
    return out
