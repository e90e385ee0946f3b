"""Batches of packed training windows: each window's positions restart, and its document ids change, at every
end-of-text; a resumable seeded sampler; fixed validation batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from moe_diff.data.corpus import Corpus
from moe_diff.errors import DataError


@dataclass
class Batch:
    tokens: torch.Tensor  # [b, T] inputs
    targets: torch.Tensor  # [b, T] the next tokens
    positions: torch.Tensor  # [b, T] restart at 0 after each end-of-text
    document_ids: torch.Tensor  # [b, T] count the end-of-texts before each token in its window

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        """`function` applied to each of the four tensors."""
        return Batch(*(function(t) for t in (self.tokens, self.targets, self.positions, self.document_ids)))

    def slice(self, start: int, stop: int) -> Batch:
        """Rows start:stop, e.g. one data-parallel rank's or one micro-batch's share."""
        return self.map(lambda t: t[start:stop])

    def to(self, device: torch.device) -> Batch:
        return self.map(lambda t: t.to(device))


class PackedSequences:
    """A token stream cut into windows of seq_len + 1 tokens (inputs and shifted targets)."""

    def __init__(self, stream: np.ndarray, seq_len: int, eot_id: int, split: str = "train"):
        if len(stream) < seq_len + 1:
            raise DataError(f"the {split} split has {len(stream):,} tokens, fewer than train.seq_len + 1 = "
                            f"{seq_len + 1}; use more data, a shorter train.seq_len or (validation) a larger "
                            "data.val_fraction")
        self.stream, self.seq_len, self.eot_id = stream, seq_len, eot_id

    def __len__(self) -> int:
        return (len(self.stream) - 1) // self.seq_len

    def window(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tokens [T + 1], positions [T], document ids [T]) of window `index`."""
        start = index * self.seq_len
        tokens = np.asarray(self.stream[start:start + self.seq_len + 1], dtype=np.int64)
        after_eot = np.concatenate([[False], tokens[:-2] == self.eot_id])  # a new document starts here
        document_ids = np.cumsum(after_eot)
        steps = np.arange(self.seq_len)
        starts = np.maximum.accumulate(np.where(after_eot, steps, 0))
        return tokens, steps - starts, document_ids


def make_batch(windows: PackedSequences, indices: Sequence[int]) -> Batch:
    tokens, positions, document_ids = zip(*(windows.window(i) for i in indices), strict=True)
    tokens = torch.from_numpy(np.stack(tokens))  # [b, T + 1]
    return Batch(tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(),
                 torch.from_numpy(np.stack(positions)), torch.from_numpy(np.stack(document_ids)))


class BatchSampler:
    """Global batches of window indices: a seeded permutation per epoch, resumable mid-epoch.

    Batches run on across epoch boundaries; state_dict() is the position in that endless sequence.
    """

    def __init__(self, n_windows: int, batch_size: int, seed: int):
        if n_windows < 1 or batch_size < 1:
            raise ValueError(f"BatchSampler needs n_windows >= 1 and batch_size >= 1, got {n_windows} and "
                             f"{batch_size}")
        self.n_windows, self.batch_size, self.seed = n_windows, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        """The epoch's order of the windows, drawn on the CPU once per epoch."""
        return torch.randperm(self.n_windows, generator=torch.Generator().manual_seed(self.seed + epoch)).tolist()

    def next_indices(self) -> list[int]:
        indices: list[int] = []
        while len(indices) < self.batch_size:
            if self.offset == self.n_windows:
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(self.batch_size - len(indices), self.n_windows - self.offset)
            indices += self._order[self.offset:self.offset + take]
            self.offset += take
        return indices

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            yield self.next_indices()

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        epoch, offset = int(state["epoch"]), int(state["offset"])
        if epoch < 0 or not 0 <= offset <= self.n_windows:
            raise DataError(f"sampler state {state} does not fit {self.n_windows} windows; the data or "
                            "train.seq_len changed since the checkpoint")
        self.epoch, self.offset = epoch, offset
        self._order = self._permutation(epoch)


def fixed_batches(windows: PackedSequences, batch_size: int, n_batches: int) -> list[Batch]:
    """The same validation batches every time: evenly spaced windows (all of them if too few)."""
    count = min(len(windows), batch_size * n_batches)
    indices = (np.arange(count) * len(windows) // count).tolist()
    return [make_batch(windows, indices[i:i + batch_size]) for i in range(0, count, batch_size)]


def validation_batches(corpus: Corpus, seq_len: int, max_tokens: int, batch_size: int = 8
                       ) -> list[tuple[Batch, torch.Tensor]]:
    """Consecutive windows of the corpus' validation split, with each token's global document index."""
    windows = PackedSequences(corpus.val, seq_len, corpus.eot_id, split="validation")
    documents = torch.from_numpy(np.concatenate([[0], np.cumsum(corpus.val[:-1] == corpus.eot_id)]))
    count = max(1, min(len(windows), max_tokens // seq_len))
    batches = []
    for start in range(0, count, batch_size):
        indices = list(range(start, min(start + batch_size, count)))
        rows = torch.stack([documents[i * seq_len:(i + 1) * seq_len] for i in indices])
        batches.append((make_batch(windows, indices), rows))
    return batches
