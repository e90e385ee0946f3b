"""Counting the reads of tensor values into Python (each one, on a GPU, waits for the device to finish its queue):
what a training step that should never wait on the host is checked with. Imports nothing of this package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__")  # what copies a tensor's values to Python


@contextlib.contextmanager
def counting_host_reads() -> Iterator[list[str]]:
    """The names of the HOST_READS made inside, in order (a TorchDispatchMode does not see `.tolist()` on the
    CPU, so the Tensor methods themselves are wrapped while it lasts)."""
    reads: list[str] = []
    real = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name: str):  # noqa: ANN202 - a method of any signature
        def read(self: torch.Tensor, *args: object, **kwargs: object) -> object:
            reads.append(name)
            return real[name](self, *args, **kwargs)
        return read

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield reads
    finally:
        for name, method in real.items():
            setattr(torch.Tensor, name, method)
