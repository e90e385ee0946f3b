"""Attention for the three modes: standard, differential (V1) and differential V2.

Each takes q, k, v after projection and rotary embedding, and the forward pass's AttentionMask (mask.py), and
returns the heads' outputs before the output projection. Query head j reads kv head j // (query heads / kv heads).
"""

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.nn.attention import flex_attention as flex
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from moe_diff.kernels.mask import AttentionMask, shared_rows
from moe_diff.kernels.precision import compute_dtype


def attention_scores(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q k^T / sqrt(d) with GQA, -inf where the mask hides a key, in the compute dtype: [B, Hk, Hq/Hk, Tq, Tk]."""
    # q: [B, Tq, Hq, d]  k: [B, Tk, Hk, d]; query head j = h * (Hq/Hk) + i reads kv head h (no copies of k)
    dtype = compute_dtype(q.dtype)
    batch, n_queries, n_query_heads, head_dim = q.shape
    q = q.to(dtype).view(batch, n_queries, k.shape[2], n_query_heads // k.shape[2], head_dim)
    scores = torch.einsum("bqhid,bkhd->bhiqk", q, k.to(dtype)) * head_dim ** -0.5
    allowed = mask.dense(n_queries, k.shape[1], q.device)
    if allowed.dim() == 3:
        allowed = allowed[:, None, None]  # [B, 1, 1, Tq, Tk], shared by the heads
    return scores.masked_fill(~allowed, float("-inf"))


def attention_probs(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with GQA, in the compute dtype: [B, Hk, Hq/Hk, Tq, Tk]."""
    return attention_scores(q, k, mask).softmax(dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with GQA, in the compute dtype (not cast back)."""
    # q: [B, T, Hq, d]  k: [B, T, Hk, d]  v: [B, T, Hk, dv]  ->  [B, T, Hq, dv]
    probs = attention_probs(q, k, mask)
    return torch.einsum("bhiqk,bkhd->bqhid", probs, v.to(probs.dtype)).flatten(2, 3)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """The same through torch's scaled_dot_product_attention (fused kernels where the shapes allow), GQA without
    copies; a plain causal mask (a window as long as the keys is one) is passed as is_causal (or, with fewer
    queries than keys on a GPU, as torch's lower-right causal bias) so the fused kernels skip the masked blocks;
    on the CPU, which builds that bias densely at every call, the rule's dense mask, built once per forward, and a
    window that leaves a block of queries fewer than all the keys in such blocks, each against the keys it reaches
    (mask.window_blocks): the CPU kernel scores every key it is given."""
    # q: [B, Tq, Hq, d]  k: [B, Tk, Hk, d]  v: [B, Tk, Hk, dv]  ->  [B, Tq, Hq, dv]
    n_queries, n_keys = q.shape[1], k.shape[1]
    plain = mask.plain_causal(n_queries, n_keys)
    if plain and n_queries == n_keys:
        return sdpa_call(q, k, v, None, causal=True)
    if plain and q.is_cuda:  # on the CPU the bias is dense
        from torch.nn.attention.bias import causal_lower_right  # imports dynamo: 2 s a process, so only here

        return sdpa_call(q, k, v, causal_lower_right(n_queries, n_keys))
    blocks = None if q.is_cuda else mask.window_blocks(n_queries, n_keys, q.device)
    if blocks is not None:
        return torch.cat([sdpa_call(q[:, queries], k[:, keys], v[:, keys], heads_share(allowed))
                          for queries, keys, allowed in blocks], dim=1)
    return sdpa_call(q, k, v, heads_share(mask.dense(n_queries, n_keys, q.device)))


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
              causal: bool = False) -> torch.Tensor:
    """scaled_dot_product_attention on [B, T, H, d] tensors."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=attn_mask, is_causal=causal, enable_gqa=True)
    return out.transpose(1, 2)


def heads_share(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean rule [Tq, Tk] or [B, Tq, Tk] as SDPA's mask, shared by the heads (one row expanded to B read
    once)."""
    allowed = shared_rows(allowed)
    return allowed[:, None] if allowed.dim() == 3 else allowed


FLEX_MAX_VALUE_WIDTH = 128


def flex_block_mask(q: torch.Tensor, k: torch.Tensor, mask: AttentionMask) -> BlockMask:
    """The block mask of the same rule (or of a cache's explicit mask) for FlexAttention, built once per forward."""
    if mask.explicit is not None:
        explicit = mask.explicit

        def allowed(b, h, i, j):
            return explicit[b, i, j]
    else:
        window, document_ids, offset = mask.window, mask.document_ids, k.shape[1] - q.shape[1]

        def allowed(b, h, i, j):
            at = i + offset  # the query's key index: the queries are the last of the keys
            keep = j <= at
            if window is not None:
                keep = keep & (j > at - window)
            if document_ids is not None:
                keep = keep & (document_ids[b, at] == document_ids[b, j])
            return keep
    batch = q.shape[0] if mask.explicit is not None or mask.document_ids is not None else None
    return mask.form(("flex", q.shape[1], k.shape[1], q.device),
                     lambda: create_block_mask(allowed, batch, None, q.shape[1], k.shape[1], device=q.device))


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """The same through torch's FlexAttention, which skips fully masked blocks (a window's cost stays linear in
    length); it is fused only under torch.compile (train.compile, or a compiled decode step)."""
    # q: [B, Tq, Hq, d]  k: [B, Tk, Hk, d]  v: [B, Tk, Hk, dv]  ->  [B, Tq, Hq, dv]
    block_mask = flex_block_mask(q, k, mask)
    # diff's 2d-wide values at d = 128 overflow the shared memory of FlexAttention's GPU backward: two halves
    values = v.split(FLEX_MAX_VALUE_WIDTH, dim=-1) if v.is_cuda else (v,)
    out = torch.cat([flex.flex_attention(q.transpose(1, 2), k.transpose(1, 2), part.transpose(1, 2),
                                         block_mask=block_mask, enable_gqa=True) for part in values], dim=-1)
    return out.transpose(1, 2)


def standard_attention(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       mask: AttentionMask) -> torch.Tensor:
    """Standard attention with `attend` (softmax_attention or sdpa_attention). q: [B, T, Hq, d], k, v: [B, T, Hk, d]
    -> [B, T, Hq, d]."""
    return attend(q, k, v, mask).to(q.dtype)


def diff_attention(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                   mask: AttentionMask) -> torch.Tensor:
    """(A1 - lam * A2) v as two attentions over the shared 2d-wide values.
    q: [B, T, H, 2, d], k: [B, T, G, 2, d], v: [B, T, G, 2d] -> [B, T, H, 2d]."""
    out1 = attend(q[..., 0, :], k[..., 0, :], v, mask)
    out2 = attend(q[..., 1, :], k[..., 1, :], v, mask)
    return (out1 - lam.to(out1.dtype) * out2).to(q.dtype)


def diff_v2_attention(attend: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                      mask: AttentionMask) -> torch.Tensor:
    """attn(q_2h) - lam[..., h] * attn(q_2h+1), one attention over the doubled query heads.
    q: [B, T, 2H, d], k, v: [B, T, Hk, d], lam: [B, T, H] -> [B, T, H, d]."""
    batch, n_tokens, n_query_heads, head_dim = q.shape
    out = attend(q, k, v, mask)
    out = out.view(batch, n_tokens, n_query_heads // 2, 2, head_dim)
    return (out[..., 0, :] - lam.to(out.dtype)[..., None] * out[..., 1, :]).to(q.dtype)


attention_reference = partial(standard_attention, softmax_attention)
diff_attention_reference = partial(diff_attention, softmax_attention)
diff_v2_attention_reference = partial(diff_v2_attention, softmax_attention)
attention_sdpa = partial(standard_attention, sdpa_attention)
attention_flex = partial(standard_attention, flex_attention)
diff_attention_flex = partial(diff_attention, flex_attention)
diff_v2_attention_flex = partial(diff_v2_attention, flex_attention)
diff_attention_sdpa = partial(diff_attention, sdpa_attention)
diff_v2_attention_sdpa = partial(diff_v2_attention, sdpa_attention)
