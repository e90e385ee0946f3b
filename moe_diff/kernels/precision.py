"""The dtypes computations run in: internal reductions (norms, softmaxes, rotary angles, lambda), and matrix
products that autocast does not reach."""

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The wider of float32 and `dtype`: float64 stays float64, bfloat16 computes in float32."""
    return torch.promote_types(dtype, torch.float32)


def matmul_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a matrix product of `x` runs in: autocast's where it is on for x's device (as F.linear would be
    cast), else x's own. For operators autocast does not cast, such as grouped_mm."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
