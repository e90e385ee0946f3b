"""Leaf operations, each a pure-PyTorch reference beside its fast versions, chosen by backend name."""

from collections.abc import Callable
from typing import NamedTuple

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
from moe_diff.kernels.moe_experts import (
    megablocks_gmm,
    moe_experts_grouped_mm,
    moe_experts_megablocks,
    moe_experts_reference,
)


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
}

MOE_BACKENDS: dict[str, Callable] = {
    "reference": moe_experts_reference,
    "grouped_mm": moe_experts_grouped_mm,
    "megablocks": moe_experts_megablocks,
}


def attention_op(backend: str, mode: str) -> Callable:
    """The attention function of `backend` for `mode` ('standard', 'diff' or 'diff_v2')."""
    return getattr(ATTENTION_BACKENDS[backend], mode)


def moe_experts_op(backend: str) -> Callable:
    """The experts function of `backend`; an optional backend that is not installed fails here, at construction."""
    if backend == "megablocks":
        try:
            megablocks_gmm()
        except ImportError as error:
            raise ConfigError(f"model.moe_backend='megablocks' is not available here: {error}") from None
    return MOE_BACKENDS[backend]
