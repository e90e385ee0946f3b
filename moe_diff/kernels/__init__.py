"""Leaf operations, each a pure-PyTorch reference beside its fast versions, chosen by backend name."""

from collections.abc import Callable
from typing import NamedTuple

import torch

from moe_diff.config import ConfigError
from moe_diff.kernels.diff_attention import (
    attention_flex,
    attention_reference,
    attention_sdpa,
    diff_attention_flex,
    diff_attention_reference,
    diff_attention_sdpa,
    diff_v2_attention_flex,
    diff_v2_attention_reference,
    diff_v2_attention_sdpa,
)
from moe_diff.kernels.diff_flash_attention import (
    attention_triton,
    diff_attention_triton,
    diff_v2_attention_triton,
)
from moe_diff.kernels.flash_attn_backend import (
    attention_flash_attn,
    diff_attention_flash_attn,
    diff_v2_attention_flash_attn,
    flash_attn_module,
)
from moe_diff.kernels.mask import AttentionMask
from moe_diff.kernels.moe_experts import (
    megablocks_gmm,
    moe_experts_auto,
    moe_experts_grouped_mm,
    moe_experts_megablocks,
    moe_experts_reference,
)
from moe_diff.kernels.triton_compat import HAVE_TRITON, TRITON_MISSING


class AttentionOps(NamedTuple):
    """One backend's attention function for each mode (see diff_attention.py for signatures)."""

    standard: Callable
    diff: Callable
    diff_v2: Callable


ATTENTION_BACKENDS: dict[str, AttentionOps] = {
    "reference": AttentionOps(attention_reference, diff_attention_reference,
                              diff_v2_attention_reference),
    "sdpa": AttentionOps(attention_sdpa, diff_attention_sdpa, diff_v2_attention_sdpa),
    "flex": AttentionOps(attention_flex, diff_attention_flex, diff_v2_attention_flex),
    "triton": AttentionOps(attention_triton, diff_attention_triton, diff_v2_attention_triton),
    "flash_attn": AttentionOps(attention_flash_attn, diff_attention_flash_attn, diff_v2_attention_flash_attn),
}
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def auto_backend(q: torch.Tensor, n_keys: int, mask: AttentionMask) -> str:
    """The fastest attention backend for these inputs, as measured on an H100 (benchmarks/results/attention-h100*):
    on a GPU, the Triton kernel where a window shorter than the sequence or packed documents let it skip key
    blocks (1.6-8.9x faster than SDPA's dense-mask path with a 4K window at 4K-32K tokens; packed documents put
    SDPA on the same path, which the kernel beat even where it skipped nothing, 6.2 against 9.9 ms at 4K tokens
    with a 4K window, measured before the kernel compared each key's document, so document ids in any pattern go
    to it, unmeasured since), SDPA's fused kernels for plain causal attention (1.7x faster than the Triton kernel
    at 16K); on the CPU, SDPA. Never flash_attn, which refuses documents that are not contiguous runs."""
    skips = mask.skips_blocks(n_keys)
    return "triton" if HAVE_TRITON and q.is_cuda and q.dtype in TRITON_DTYPES and skips else "sdpa"


def _auto(mode: str) -> Callable:
    def attend(q: torch.Tensor, k: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        return getattr(ATTENTION_BACKENDS[auto_backend(q, k.shape[1], args[-1])], mode)(q, k, *args)

    attend.__doc__ = f"{mode} attention through auto_backend"
    return attend


ATTENTION_BACKENDS["auto"] = AttentionOps(_auto("standard"), _auto("diff"), _auto("diff_v2"))

MOE_BACKENDS: dict[str, Callable] = {
    "reference": moe_experts_reference,
    "grouped_mm": moe_experts_grouped_mm,
    "megablocks": moe_experts_megablocks,
    "auto": moe_experts_auto,
}


def attention_op(backend: str, mode: str) -> Callable:
    """The attention function of `backend` for `mode` ('standard', 'diff' or 'diff_v2'); a backend that is not
    installed fails here, at construction."""
    if backend == "triton" and not HAVE_TRITON:
        raise ConfigError(f"model.attn_backend='triton' is not available here: {TRITON_MISSING}")
    if backend == "flash_attn":
        try:
            flash_attn_module()
        except ImportError as error:
            raise ConfigError(f"model.attn_backend='flash_attn' is not available here: {error}") from None
    return getattr(ATTENTION_BACKENDS[backend], mode)


def moe_experts_op(backend: str) -> Callable:
    """The experts function of `backend`; an optional backend that is not installed fails here, at construction."""
    if backend == "megablocks":
        try:
            megablocks_gmm()
        except ImportError as error:
            raise ConfigError(f"model.moe_backend='megablocks' is not available here: {error}") from None
    return MOE_BACKENDS[backend]
