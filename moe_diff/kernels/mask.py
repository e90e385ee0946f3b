"""Which keys each query may see: one rule per forward pass, shared by every layer and every attention backend.

Query i sees key j when i - window < j <= i (window None: every j <= i) and, for packed sequences, when both carry
the same document id, wherever the id's tokens lie in the row (an attention_mask with a hole gives a document that
continues after it; a backend that can only express contiguous runs refuses such ids). The queries are the last Tq
of the Tk keys: Tq = Tk in one process; under context parallelism a rank's queries are its own positions and the
keys run from the earliest position they may see (query i is then key Tk - Tq + i, and the document ids cover the
keys), so every backend skips what lies outside the window there too. Against a KV cache the keys
are the cached ones and the new ones, in the cache's slot order, so the cache gives the mask explicitly
([B, Tq, Tk]: its rule applied to the keys' sequence indices, a left-padded row's padding hidden). Each backend's
form of the mask (the dense boolean mask or a short window's blocks of it, FlexAttention's block mask, the Triton
kernel's key bounds, where each document begins) is built on first use and kept, so it is built once per forward,
not once per layer (in a compiled block, once per block).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch


def causal_window_mask(query_index: torch.Tensor, key_index: torch.Tensor, window: int | None) -> torch.Tensor:
    """[Tq, Tk]: True where the key's sequence index j and the query's i satisfy i - window < j <= i."""
    i, j = query_index[:, None], key_index[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def shared_rows(mask: torch.Tensor) -> torch.Tensor:
    """A [B, ...] mask as [1, ...] where it is one row expanded to B (a batch stride of 0), else as it is: a
    backend that broadcasts the mask then reads, and converts, one row."""
    return mask[:1] if mask.dim() == 3 and mask.stride(0) == 0 else mask


def rule_mask(queries: slice, keys: slice, window: int | None, device: torch.device,
              document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where the query at key index i in `queries` may attend to key j in `keys`: [Tq, Tk], or
    [B, Tq, Tk] with the keys' document ids [B, Tk] (all of them)."""
    allowed = causal_window_mask(torch.arange(queries.start, queries.stop, device=device),
                                 torch.arange(keys.start, keys.stop, device=device), window)
    if document_ids is not None:  # tokens of different packed documents never meet
        allowed = allowed & (document_ids[:, queries, None] == document_ids[:, None, keys])
    return allowed


def attention_mask(n_queries: int, n_keys: int, window: int | None, device: torch.device,
                   document_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where query i (key n_keys - n_queries + i) may attend to key j: [Tq, Tk], or [B, Tq, Tk]
    with the keys' document ids [B, Tk]."""
    return rule_mask(slice(n_keys - n_queries, n_keys), slice(0, n_keys), window, device, document_ids)


QUERY_BLOCK = 1024  # queries per block where a short window is run block by block


def window_spans(n_queries: int, n_keys: int, window: int | None) -> list[tuple[slice, slice]] | None:
    """Blocks of QUERY_BLOCK queries, each with the keys the window lets it see (the queries the last of the keys),
    where a block sees fewer than all the keys (they are a block and a window or more); else None."""
    if window is None or n_keys < QUERY_BLOCK + window:
        return None
    offset = n_keys - n_queries
    return [(slice(start, stop), slice(max(0, offset + start - window + 1), offset + stop))
            for start in range(0, n_queries, QUERY_BLOCK) for stop in [min(start + QUERY_BLOCK, n_queries)]]


def run_begins(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T] boolean: True where a token begins a run of one id in its row."""
    begins = torch.ones_like(document_ids, dtype=torch.bool)
    begins[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return begins


def run_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the index of the first token of each token's run of one id in its row."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device)
    return torch.where(run_begins(document_ids), index, 0).cummax(dim=1).values


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the index of the first token of each token's document in its row (a name for the document below T);
    sorted on the device, no host sync."""
    ids, order = document_ids.sort(dim=1, stable=True)  # each document's tokens together, in sequence order
    first = order.gather(1, run_starts(ids))  # [B, T] in sorted order: where each one's document begins
    return torch.empty_like(order).scatter_(1, order, first)


@dataclass(eq=False)
class AttentionMask:
    """The rule of one forward pass: a window and packed documents over Tk keys, of which the Tq queries are the
    last, or a KV cache's explicit mask."""

    window: int | None = None
    document_ids: torch.Tensor | None = None  # [B, Tk]
    explicit: torch.Tensor | None = None  # [B, Tq, Tk] boolean, from a KV cache
    _forms: dict[Hashable, Any] = field(default_factory=dict, init=False, repr=False)

    def plain_causal(self, n_queries: int, n_keys: int) -> bool:
        """Every earlier key is visible: no documents, no cache mask, no window shorter than the keys."""
        return (self.explicit is None and self.document_ids is None
                and (self.window is None or self.window >= n_keys))

    def skips_blocks(self, n_keys: int) -> bool:
        """Whether a kernel that skips fully masked key blocks saves work: a window shorter than the keys, or
        packed documents."""
        return (self.window is not None and self.window < n_keys) or self.document_ids is not None

    def document_starts(self) -> torch.Tensor:
        """[B, Tk]: where each key's document begins in its row (document_starts), built once per forward."""
        return self.form("document_starts", lambda: document_starts(self.document_ids))

    def documents_are_runs(self) -> bool:
        """Whether every document is one contiguous run of its row, as cu_seqlens describe them; decided once per
        forward (a host sync)."""
        return self.form("documents_are_runs",
                         lambda: torch.equal(self.document_starts(), run_starts(self.document_ids)))

    def form(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """A backend's form of the mask, built by `build` the first time `key` is asked for; built each time in a
        compiled block, whose graph holds no state from outside (checkpointing refuses to trace a mutation)."""
        if torch.compiler.is_compiling():
            return build()
        if key not in self._forms:
            self._forms[key] = build()
        return self._forms[key]

    def window_blocks(self, n_queries: int, n_keys: int, device: torch.device
                      ) -> list[tuple[slice, slice, torch.Tensor]] | None:
        """window_spans with each block's rule ([Tb, Kb], or [B, Tb, Kb] with documents), built once per forward;
        None where there are none or a cache gives the mask."""
        spans = window_spans(n_queries, n_keys, self.window) if self.explicit is None else None
        if spans is None:
            return None
        offset = n_keys - n_queries
        return self.form(("window blocks", n_queries, n_keys, device), lambda: [
            (queries, keys, rule_mask(slice(offset + queries.start, offset + queries.stop), keys, self.window,
                                      device, self.document_ids)) for queries, keys in spans])

    def dense(self, n_queries: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """True where query i may attend to key j: [Tq, Tk], or [B, Tq, Tk] with documents or a cache."""
        if self.explicit is not None:
            return self.explicit
        return self.form(("dense", n_queries, n_keys, device),
                         lambda: attention_mask(n_queries, n_keys, self.window, device, self.document_ids))
