"""Record a model's routing on batches of tokens into a RoutingTrace (one forward pass per batch)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from rich.progress import track

from moe_diff.data import Batch
from moe_diff.model import MoEDiffTransformer
from moe_diff.routing.trace import RoutingTrace


@torch.no_grad()
def collect_trace(model: MoEDiffTransformer, batches: Iterable[tuple[Batch, torch.Tensor]], document_names: list[str],
                  header: dict, progress: bool = False) -> RoutingTrace:
    """Run the model on (batch, global document ids [b, T]) pairs and keep every token's routing."""
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in ("tokens", "positions", "documents", "sequences",
                                                                   "experts", "weights", "probs")}
    n_sequences = 0
    items = list(batches)
    for batch, documents in (track(items, description="routing") if progress else items):
        out = model(batch.tokens, batch.positions, batch.document_ids)
        routings = out.routings  # as the model chose: expert bias and capacity drops included
        rows, length = batch.tokens.shape
        parts["tokens"].append(batch.tokens.flatten().cpu())
        parts["positions"].append(batch.positions.flatten().cpu())
        parts["documents"].append(documents.flatten().cpu())
        parts["sequences"].append(torch.arange(n_sequences, n_sequences + rows).repeat_interleave(length))
        parts["experts"].append(torch.stack([r.expert_ids for r in routings]).cpu())
        parts["weights"].append(torch.stack([r.weights for r in routings]).float().cpu())
        parts["probs"].append(torch.stack([r.probs for r in routings]).float().cpu())
        n_sequences += rows
    flat = {name: torch.cat(values, dim=1 if name in ("experts", "weights", "probs") else 0)
            for name, values in parts.items()}
    return RoutingTrace(flat["tokens"], flat["positions"], flat["documents"], flat["sequences"], flat["experts"],
                        flat["weights"], flat["probs"], document_names, header)


def trace_sequences(model: MoEDiffTransformer, tokens: torch.Tensor, header: dict) -> RoutingTrace:
    """The routing of whole sequences [B, T] (e.g. a prompt and its generated continuation), one document each."""
    batch, length = tokens.shape
    positions = torch.arange(length, device=tokens.device).expand(batch, length)
    documents = torch.arange(batch, device=tokens.device)[:, None].expand(batch, length)
    packed = Batch(tokens, tokens, positions, None)
    return collect_trace(model, [(packed, documents)], [f"sequence {i}" for i in range(batch)], header)
