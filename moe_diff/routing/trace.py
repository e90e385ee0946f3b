"""Routing traces: which experts each token chose, layer by layer, in one safetensors file.

The tensors hold the per-token records; the file's metadata holds a small JSON header. Traces
from diagnosis, generation and training share the format, so one tool reads them all.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from moe_diff.errors import MoeDiffError

FORMAT = "moe-diff-routing-trace"
VERSION = 1


class TraceError(MoeDiffError, ValueError):
    """A file that is not a routing trace, or a trace whose parts disagree."""


@dataclass
class RoutingTrace:
    token_ids: torch.Tensor  # [N] int64
    positions: torch.Tensor  # [N] position of each token within its document
    document_ids: torch.Tensor  # [N] index into document_names
    sequence_ids: torch.Tensor  # [N] tokens of one sequence are consecutive and share an id
    expert_ids: torch.Tensor  # [L, N, K] chosen experts, by decreasing probability
    weights: torch.Tensor  # [L, N, K] their renormalised weights
    probs: torch.Tensor  # [L, N, E] router probabilities over all experts
    document_names: list[str] = field(default_factory=list)
    header: dict[str, Any] = field(default_factory=dict)  # source, tokenizer, model config, ...

    @property
    def n_layers(self) -> int:
        return self.expert_ids.shape[0]

    @property
    def n_tokens(self) -> int:
        return self.expert_ids.shape[1]

    @property
    def top_k(self) -> int:
        return self.expert_ids.shape[2]

    @property
    def n_experts(self) -> int:
        return self.probs.shape[2]

    def check(self) -> None:
        """Raise TraceError unless every tensor agrees on the number of layers, tokens and experts."""
        n = self.n_tokens
        for name in ("token_ids", "positions", "document_ids", "sequence_ids"):
            if tuple(getattr(self, name).shape) != (n,):
                raise TraceError(f"trace tensor {name} has shape {list(getattr(self, name).shape)}, expected [{n}]")
        if self.weights.shape != self.expert_ids.shape or self.probs.shape[:2] != self.expert_ids.shape[:2]:
            raise TraceError(f"trace tensors disagree: expert_ids {list(self.expert_ids.shape)}, weights "
                             f"{list(self.weights.shape)}, probs {list(self.probs.shape)}")
        if n and int(self.document_ids.max()) >= max(len(self.document_names), 1):
            raise TraceError("trace document_ids point past its document_names")


TENSORS = ("token_ids", "positions", "document_ids", "sequence_ids", "expert_ids", "weights", "probs")


def save_trace(trace: RoutingTrace, path: str | Path) -> Path:
    trace.check()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {name: getattr(trace, name).detach().cpu().contiguous() for name in TENSORS}
    tensors["probs"] = tensors["probs"].to(torch.float16)  # halves the file; plenty for statistics
    header = {"format": FORMAT, "version": VERSION, "document_names": trace.document_names, **trace.header}
    save_file(tensors, path, metadata={"header": json.dumps(header)})
    return path


def is_trace(path: str | Path) -> bool:
    try:
        with safe_open(str(path), "pt") as file:
            return FORMAT in (file.metadata() or {}).get("header", "")
    except (SafetensorError, OSError):
        return False


def load_trace(path: str | Path) -> RoutingTrace:
    try:
        with safe_open(str(path), "pt") as file:
            header = json.loads((file.metadata() or {}).get("header", "{}"))
            if header.get("format") != FORMAT:
                raise TraceError(f"{path} is not a routing trace (no '{FORMAT}' header)")
            if header.get("version") != VERSION:
                raise TraceError(f"{path} is a routing trace of version {header.get('version')}; this reads {VERSION}")
            missing = [name for name in TENSORS if name not in file.keys()]
            if missing:
                raise TraceError(f"{path} lacks trace tensors {', '.join(missing)}")
            tensors = {name: file.get_tensor(name) for name in TENSORS}
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise TraceError(f"{path} cannot be read as a routing trace: {error}") from None
    tensors["probs"] = tensors["probs"].float()
    names = header.pop("document_names", [])
    for key in ("format", "version"):
        header.pop(key)
    trace = RoutingTrace(**tensors, document_names=names, header=header)
    trace.check()
    return trace
