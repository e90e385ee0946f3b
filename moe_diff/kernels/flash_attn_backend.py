"""The `flash_attn` attention backend: the flash-attn package's kernels (CUDA, fp16/bf16), where it is installed.

Causal attention with the window as flash-attn's `window_size=(W - 1, 0)` (both aligned at the last query and key,
as the rule's queries are the last of its keys); packed documents as variable-length sequences (`cu_seqlens`, one
per document of each row, for the keys and for the queries), so only documents that are contiguous runs of their row:
other document ids (an attention_mask with a hole makes them) are refused, and `auto` never picks this backend.
GQA natively. flash-attn needs values as wide as the keys, so diff's 2d-wide values go through as two halves (the
official DIFF code's variant without its patched kernel), and diff_v2 is one call over the doubled query heads.
An explicit cache mask (decoding against a rolling KV cache) is not a flash-attn shape: those steps run through
SDPA.
"""

from __future__ import annotations

from functools import partial

import torch

from moe_diff.errors import UsageError
from moe_diff.kernels.diff_attention import diff_attention, diff_v2_attention, sdpa_attention, standard_attention
from moe_diff.kernels.mask import AttentionMask, run_begins

FLASH_ATTN_MISSING = ("flash-attn is not installed: pip install 'moe-diff[flash-attn]' on a CUDA machine "
                      "(it builds from source), or use attn_backend='triton' or 'sdpa'")


def flash_attn_module():
    """flash_attn, or ImportError naming what to install."""
    try:
        import flash_attn
    except ImportError:
        raise ImportError(FLASH_ATTN_MISSING) from None
    return flash_attn


def document_sequences(document_ids: torch.Tensor, n_queries: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """cu_seqlens (int32, [sequences + 1]) of the flattened [B*Tq] queries and [B*Tk] keys, one sequence per run of
    one document id in a row of the keys' ids [B, Tk] (one per document where documents are contiguous runs; a
    run before the queries, the last Tq keys, has none of them), and the longest of each."""
    batch, n_keys = document_ids.shape
    begin = run_begins(document_ids).flatten().nonzero().flatten()  # each run's first key, flat
    key_lengths = torch.diff(begin, append=begin.new_tensor([batch * n_keys]))
    first = begin % n_keys  # within its row
    query_lengths = (first + key_lengths - first.clamp(min=n_keys - n_queries)).clamp(min=0)
    cu_queries, cu_keys = (torch.cat([begin.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)
                           for lengths in (query_lengths, key_lengths))
    return cu_queries, cu_keys, int(query_lengths.max()), int(key_lengths.max())


def flash_attn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """q: [B, Tq, Hq, d], k: [B, Tk, Hk, d], v: [B, Tk, Hk, dv] -> [B, Tq, Hq, dv], the rule of the AttentionMask."""
    if mask.explicit is not None:  # rolling-cache steps: not a flash-attn layout
        return sdpa_attention(q, k, v, mask)
    flash = flash_attn_module()
    if v.shape[-1] != q.shape[-1]:  # flash-attn wants values as wide as the keys
        return torch.cat([flash_attn_attention(q, k, half, mask) for half in v.split(q.shape[-1], dim=-1)], dim=-1)
    window_size = (mask.window - 1, 0) if mask.window is not None else (-1, -1)
    if mask.document_ids is None:
        return flash.flash_attn_func(q, k, v, causal=True, window_size=window_size)
    if not mask.documents_are_runs():
        raise UsageError("attn_backend='flash_attn' takes packed documents only as contiguous runs of one id "
                         "(cu_seqlens), but a document id here returns after another (an attention_mask with a hole "
                         "gives such ids): use attn_backend='triton', 'sdpa' or 'auto'")
    batch, n_queries = q.shape[:2]
    sequences = mask.form(("flash_attn", n_queries), lambda: document_sequences(mask.document_ids, n_queries))
    out = flash.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), *sequences, causal=True,
                                       window_size=window_size)
    return out.view(batch, n_queries, *out.shape[1:])


attention_flash_attn = partial(standard_attention, flash_attn_attention)
diff_attention_flash_attn = partial(diff_attention, flash_attn_attention)
diff_v2_attention_flash_attn = partial(diff_v2_attention, flash_attn_attention)
