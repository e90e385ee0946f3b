"""A rank's piece of a tensor of the job: a DTensor's local block and where it lies in the whole tensor, or
a whole tensor as it is."""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset


def local_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's piece of a DTensor (a parameter or gradient split over the mesh), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class Piece(NamedTuple):
    """This rank's block of a whole tensor: where it starts, its values, and the whole tensor's shape."""

    offset: tuple[int, ...]
    local: torch.Tensor
    whole_shape: torch.Size


def piece(tensor: torch.Tensor) -> Piece:
    """This rank's piece of a parameter, gradient or optimizer moment (a DTensor of the job, or whole)."""
    if not isinstance(tensor, DTensor):
        return Piece((0,) * tensor.dim(), tensor, tensor.shape)
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return Piece(tuple(offset), tensor.to_local(), tensor.shape)
