"""The flash_attn backend's translation of the attention rule into flash-attn calls (window_size, causal,
cu_seqlens for packed documents, GQA, value halves), checked against the reference with a stand-in for the
flash_attn package written from flash-attn's documented semantics (the real package needs CUDA and a build)."""

import sys
import types

import pytest
import torch

from moe_diff.config import ConfigError, ModelConfig
from moe_diff.errors import UsageError
from moe_diff.kernels import attention_op
from moe_diff.kernels.flash_attn_backend import document_sequences
from moe_diff.kernels.mask import AttentionMask
from moe_diff.model import MoEDiffTransformer


def documented_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                         window_size: tuple[int, int]) -> torch.Tensor:
    """One sequence, flash-attn's contract: q [T, Hq, d], k and v [T, Hk, d] with equal widths, query head h
    reads kv head h // (Hq / Hk), query i sees keys in [i - left, i + right] (and j <= i when causal)."""
    assert q.shape[-1] == k.shape[-1] == v.shape[-1], "flash-attn takes one head width"
    assert causal
    n, heads = q.shape[0], q.shape[1]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    left, right = window_size
    allowed = (j <= i) & ((j >= i - left) if left >= 0 else True) & ((j <= i + right) if right >= 0 else True)
    scores = torch.einsum("qhd,khd->hqk", q, k) * q.shape[-1] ** -0.5
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~allowed, float("-inf")).softmax(-1), v)


def stand_in() -> types.ModuleType:
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        return torch.stack([documented_attention(*(t[b] for t in (q, k, v)), causal, window_size)
                            for b in range(q.shape[0])])

    def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=False,
                               window_size=(-1, -1)):
        assert torch.equal(cu_seqlens_q, cu_seqlens_k) and cu_seqlens_q.dtype == torch.int32
        bounds = cu_seqlens_q.tolist()
        assert max_seqlen_q == max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        return torch.cat([documented_attention(q[a:b], k[a:b], v[a:b], causal, window_size)
                          for a, b in zip(bounds, bounds[1:], strict=False)])

    module.flash_attn_func, module.flash_attn_varlen_func = flash_attn_func, flash_attn_varlen_func
    return module


def mode_inputs(mode: str, n: int) -> list[torch.Tensor]:
    """Float64 q, k, v (and lambda) of one mode over n tokens: 4 query heads (pairs, for diff_v2), 2 kv heads."""
    generator = torch.Generator().manual_seed(0)
    d = 4
    shapes = {"standard": [(2, n, 4, d), (2, n, 2, d), (2, n, 2, d)],
              "diff": [(2, n, 4, 2, d), (2, n, 2, 2, d), (2, n, 2, 2 * d)],
              "diff_v2": [(2, n, 8, d), (2, n, 2, d), (2, n, 2, d)]}[mode]
    inputs = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in shapes]
    if mode == "diff":
        inputs.append(torch.tensor(0.4, dtype=torch.float64))
    elif mode == "diff_v2":
        inputs.append(torch.rand(2, n, 4, dtype=torch.float64, generator=generator))
    return inputs


RUNS = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 1]])
UNORDERED_RUNS = torch.tensor([[5, 5, 2, 2, 2, 7, 0, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 1]])  # runs, ids in no order


@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize(("window", "documents"), [(None, None), (3, None), (4, RUNS), (None, UNORDERED_RUNS)])
def test_flash_attn_calls_equal_the_reference(monkeypatch: pytest.MonkeyPatch, mode: str, window: int | None,
                                              documents: torch.Tensor | None) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in())
    inputs = mode_inputs(mode, 9)
    results = []
    for backend in ("reference", "flash_attn"):
        args = [t.clone().requires_grad_() for t in inputs]
        out = attention_op(backend, mode)(*args, AttentionMask(window, documents))
        out.square().sum().backward()
        results.append([out] + [a.grad for a in args])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
def test_documents_that_are_not_runs_are_refused(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    """cu_seqlens cannot say that a document continues after a hole: flash_attn refuses such ids by name rather
    than attend within each run."""
    monkeypatch.setitem(sys.modules, "flash_attn", stand_in())
    documents = torch.tensor([[1, 1, 0, 1, 1, 1, 1, 1, 1], RUNS[0].tolist()])
    with pytest.raises(UsageError, match=r"attn_backend='flash_attn'.*contiguous run.*'triton', 'sdpa' or 'auto'"):
        attention_op("flash_attn", mode)(*mode_inputs(mode, 9), AttentionMask(None, documents))


def test_documents_become_one_sequence_each() -> None:
    cu_queries, cu_keys, longest_queries, longest_keys = document_sequences(torch.tensor([[0, 0, 1], [5, 5, 5]]), 3)
    assert cu_queries.tolist() == cu_keys.tolist() == [0, 2, 3, 6] and longest_queries == longest_keys == 3
    # the last 2 of 5 keys are queries: the first run has none of them, the second one, the third all
    cu_queries, cu_keys, longest_queries, longest_keys = document_sequences(torch.tensor([[0, 0, 1, 1, 2],
                                                                                          [3, 3, 3, 3, 3]]), 2)
    assert cu_keys.tolist() == [0, 2, 4, 5, 10] and longest_keys == 5
    assert cu_queries.tolist() == [0, 0, 1, 2, 4] and longest_queries == 2


def test_missing_flash_attn_names_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flash_attn", None)  # importing it raises ImportError
    with pytest.raises(ConfigError, match=r"attn_backend='flash_attn' is not available.*pip install"):
        MoEDiffTransformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                                       attn_backend="flash_attn"))
