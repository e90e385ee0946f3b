"""Attention for the three modes: standard, differential (V1) and differential V2.

Each takes q, k, v after projection and rotary embedding and returns the heads' outputs
before the output projection. Query head j reads kv head j // (query heads / kv heads),
and query i sees key j when i - window < j <= i (window None: every j <= i) and, for packed
sequences, when both carry the same document id. An explicit boolean `mask` [B, Tq, Tk]
replaces that rule (decoding against a KV cache, where keys outnumber queries).
"""

import torch

from moe_diff.kernels.precision import compute_dtype


def causal_window_mask(query_index: torch.Tensor, key_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk]: True where the key's sequence index j and the query's i satisfy i - window < j <= i."""
    i, j = query_index[:, None], key_index[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def attention_mask(n_tokens: int, window: int | None, device: torch.device,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where query i may attend to key j: [T, T], or [B, T, T] with document ids."""
    index = torch.arange(n_tokens, device=device)
    allowed = causal_window_mask(index, index, window)
    if document_ids is not None:  # [B, T]: tokens of different packed documents never meet
        allowed = allowed & (document_ids[:, :, None] == document_ids[:, None, :])
    return allowed


def attention_probs(q: torch.Tensor, k: torch.Tensor, window: int | None,
                    document_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) with GQA, in the compute dtype: [B, Hk, Hq/Hk, Tq, Tk]."""
    # q: [B, Tq, Hq, d]  k: [B, Tk, Hk, d]; query head j = h * (Hq/Hk) + i reads kv head h (no copies of k)
    dtype = compute_dtype(q.dtype)
    batch, n_queries, n_query_heads, head_dim = q.shape
    q = q.to(dtype).view(batch, n_queries, k.shape[2], n_query_heads // k.shape[2], head_dim)
    scores = torch.einsum("bqhid,bkhd->bhiqk", q, k.to(dtype)) * head_dim ** -0.5
    if mask is None:
        mask = attention_mask(n_queries, window, q.device, document_ids)
    if mask.dim() == 3:
        mask = mask[:, None, None]  # [B, 1, 1, Tq, Tk], shared by the heads
    return scores.masked_fill(~mask, float("-inf")).softmax(dim=-1)


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                      document_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with GQA, in the compute dtype (not cast back)."""
    # q: [B, T, Hq, d]  k: [B, T, Hk, d]  v: [B, T, Hk, dv]  ->  [B, T, Hq, dv]
    probs = attention_probs(q, k, window, document_ids, mask)
    return torch.einsum("bhiqk,bkhd->bqhid", probs, v.to(probs.dtype)).flatten(2, 3)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int | None,
                        document_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Standard attention. q: [B, T, Hq, d], k, v: [B, T, Hk, d] -> [B, T, Hq, d]."""
    return softmax_attention(q, k, v, window, document_ids, mask).to(q.dtype)


def diff_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                             window: int | None, document_ids: torch.Tensor | None = None,
                             mask: torch.Tensor | None = None) -> torch.Tensor:
    """(A1 - lam * A2) v. q: [B, T, H, 2, d], k: [B, T, G, 2, d], v: [B, T, G, 2d] -> [B, T, H, 2d]."""
    out1 = softmax_attention(q[..., 0, :], k[..., 0, :], v, window, document_ids, mask)
    out2 = softmax_attention(q[..., 1, :], k[..., 1, :], v, window, document_ids, mask)
    return (out1 - lam.to(out1.dtype) * out2).to(q.dtype)


def diff_v2_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lam: torch.Tensor,
                                window: int | None, document_ids: torch.Tensor | None = None,
                                mask: torch.Tensor | None = None) -> torch.Tensor:
    """attn(q_2h) - lam[..., h] * attn(q_2h+1).

    q: [B, T, 2H, d], k, v: [B, T, Hk, d], lam: [B, T, H] -> [B, T, H, d].
    """
    batch, n_tokens, n_query_heads, head_dim = q.shape
    out = softmax_attention(q, k, v, window, document_ids, mask)
    out = out.view(batch, n_tokens, n_query_heads // 2, 2, head_dim)
    return (out[..., 0, :] - lam.to(out.dtype)[..., None] * out[..., 1, :]).to(q.dtype)
