"""The attention references of the three modes against brute-force loops (the oracle all backends share)."""

import math

import pytest
import torch
from helpers import scattered_documents, sdpa_blocks  # tests/ is on the path

from moe_diff.kernels import ATTENTION_BACKENDS, attention_op
from moe_diff.kernels.mask import AttentionMask, attention_mask

SHAPES = [(1, 1, None), (2, 2, 3), (4, 1, 2), (4, 2, 9), (2, 1, 1), (1, 2, 7)]  # (GQA ratio, kv heads, window)


def brute_attention(q, k, v, window, documents=None):
    """out[b, i, h] = sum_j softmax_j(q.k / sqrt(d)) v over visible keys, kv head h // ratio."""
    batch, n, heads, d = q.shape
    ratio = heads // k.shape[2]
    out = torch.zeros(batch, n, heads, v.shape[-1], dtype=torch.float64)
    for b in range(batch):
        for h in range(heads):
            for i in range(n):
                keys = [j for j in range(n) if j <= i and (window is None or j > i - window)
                        and (documents is None or documents[b, i] == documents[b, j])]
                weights = torch.stack([q[b, i, h] @ k[b, j, h // ratio] / math.sqrt(d) for j in keys]).softmax(0)
                out[b, i, h] = sum(w * v[b, j, h // ratio] for w, j in zip(weights, keys, strict=True))
    return out


def randn(*shape):
    return torch.randn(*shape, dtype=torch.float64)


@pytest.mark.parametrize(("ratio", "kv_heads", "window"), SHAPES)
@pytest.mark.parametrize("n", [5, 8])
def test_standard(ratio: int, kv_heads: int, window: int | None, n: int) -> None:
    torch.manual_seed(n)
    q, k, v = randn(2, n, ratio * kv_heads, 4), randn(2, n, kv_heads, 4), randn(2, n, kv_heads, 4)
    out = attention_op("reference", "standard")(q, k, v, AttentionMask(window))
    torch.testing.assert_close(out, brute_attention(q, k, v, window), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("ratio", "groups", "window"), SHAPES)
def test_diff(ratio: int, groups: int, window: int | None) -> None:
    """Head h: (A1 - lam A2) v_g with q1 = q[..., 0, :], k1 = k[..., 0, :], g = h // ratio, v 2d wide."""
    torch.manual_seed(ratio)
    n, d = 7, 4
    q, k, v = randn(2, n, ratio * groups, 2, d), randn(2, n, groups, 2, d), randn(2, n, groups, 2 * d)
    lam = torch.tensor(0.37, dtype=torch.float64)
    out = attention_op("reference", "diff")(q, k, v, lam, AttentionMask(window))
    first = brute_attention(q[..., 0, :], k[..., 0, :], v, window)
    second = brute_attention(q[..., 1, :], k[..., 1, :], v, window)
    torch.testing.assert_close(out, first - 0.37 * second, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("ratio", "kv_heads", "window"), SHAPES)
def test_diff_v2(ratio: int, kv_heads: int, window: int | None) -> None:
    """Pair h: attn(q_2h) - lam[..., h] attn(q_2h+1); both query heads of a pair read one kv head."""
    torch.manual_seed(ratio)
    n, d, pairs = 6, 4, ratio * kv_heads
    q, k, v = randn(2, n, 2 * pairs, d), randn(2, n, kv_heads, d), randn(2, n, kv_heads, d)
    lam = torch.rand(2, n, pairs, dtype=torch.float64)
    out = attention_op("reference", "diff_v2")(q, k, v, lam, AttentionMask(window))
    every = brute_attention(q, k, v, window)  # query head j reads kv head j // (2 * ratio)
    torch.testing.assert_close(out, every[:, :, 0::2] - lam[..., None] * every[:, :, 1::2], rtol=0, atol=1e-12)


@pytest.mark.parametrize("documents", [torch.tensor([[0, 0, 1, 1, 1, 2], [0, 1, 1, 2, 2, 2]]),
                                       torch.tensor([[1, 1, 0, 1, 1, 1], [2, 0, 1, 0, 2, 2]])])
def test_documents_mask_packed_sequences(documents: torch.Tensor) -> None:
    """Keys of the query's document id, wherever they are in the row: contiguous runs or not."""
    torch.manual_seed(0)
    q, k, v = randn(2, 6, 2, 4), randn(2, 6, 1, 4), randn(2, 6, 1, 4)
    out = attention_op("reference", "standard")(q, k, v, AttentionMask(4, documents))
    torch.testing.assert_close(out, brute_attention(q, k, v, 4, documents), rtol=0, atol=1e-12)


def test_document_starts_name_each_document_by_its_first_token() -> None:
    documents = torch.tensor([[7, 7, 3, 7, 3, 9], [1, 1, 1, 2, 2, 5]])
    mask = AttentionMask(document_ids=documents)
    assert mask.document_starts().tolist() == [[0, 0, 2, 0, 2, 5], [0, 0, 0, 3, 3, 5]]
    assert not mask.documents_are_runs() and AttentionMask(document_ids=documents[1:]).documents_are_runs()


@pytest.mark.parametrize(("n", "window"), [(1, None), (6, None), (6, 1), (6, 3), (6, 10)])
def test_mask(n: int, window: int | None) -> None:
    expected = [[j <= i and (window is None or j > i - window) for j in range(n)] for i in range(n)]
    assert attention_mask(n, n, window, torch.device("cpu")).tolist() == expected


def test_every_configured_backend_is_registered() -> None:
    from moe_diff.config import ATTN_BACKENDS, MOE_BACKENDS
    from moe_diff.kernels import MOE_BACKENDS as MOE_OPS

    assert set(ATTENTION_BACKENDS) == set(ATTN_BACKENDS) and set(MOE_OPS) == set(MOE_BACKENDS)


def test_bfloat16_inputs_accumulate_in_float32() -> None:
    torch.manual_seed(0)
    q, k, v = randn(1, 9, 2, 8), randn(1, 9, 2, 8), randn(1, 9, 2, 8)
    out = attention_op("reference", "standard")(q.bfloat16(), k.bfloat16(), v.bfloat16(), AttentionMask())
    assert out.dtype == torch.bfloat16
    exact = brute_attention(q.bfloat16().double(), k.bfloat16().double(), v.bfloat16().double(), None)
    assert (out.double() - exact).abs().max() < 1e-2


def mode_inputs(mode: str, ratio: int, kv_heads: int, n: int, keys: int) -> tuple:
    """q, k, v, lam of one mode (float64, requiring gradients): n queries against `keys` keys (for diff,
    kv_heads counts the groups of two)."""
    d = 4
    if mode == "diff":
        shapes = [(2, n, ratio * kv_heads, 2, d), (2, keys, kv_heads, 2, d), (2, keys, kv_heads, 2 * d), ()]
    elif mode == "diff_v2":
        shapes = [(2, n, 2 * ratio * kv_heads, d), (2, keys, kv_heads, d), (2, keys, kv_heads, d),
                  (2, n, ratio * kv_heads)]
    else:
        shapes = [(2, n, ratio * kv_heads, d), (2, keys, kv_heads, d), (2, keys, kv_heads, d)]
    return tuple(torch.randn(shape, dtype=torch.float64).requires_grad_() for shape in shapes)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize(("ratio", "kv_heads", "window"), SHAPES)
@pytest.mark.parametrize("packed", [None, "runs", "scattered"])
def test_fused_backends_equal_the_reference_in_values_and_gradients(backend: str, mode: str, ratio: int,
                                                                    kv_heads: int, window: int | None,
                                                                    packed: str | None) -> None:
    """Packed documents as increasing runs, or as ids that return to a document after others."""
    torch.manual_seed(ratio + kv_heads)
    inputs = mode_inputs(mode, ratio, kv_heads, 7, 7)
    documents = {None: None, "runs": torch.tensor([[0, 0, 0, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 2]]),
                 "scattered": scattered_documents(7, ratio + kv_heads)}[packed]
    results = []
    # FlexAttention has no CPU backward: its gradients are checked where there is a GPU
    device = "cuda" if backend == "flex" and torch.cuda.is_available() else "cpu"
    backward = backend != "flex" or device == "cuda"
    for op in (attention_op("reference", mode), attention_op(backend, mode)):
        args = [t.detach().to(device).requires_grad_(backward) for t in inputs]
        out = op(*args, AttentionMask(window, None if documents is None else documents.to(device)))
        if backward:
            out.square().sum().backward()
        results.append([out.cpu()] + [a.grad.cpu() for a in args if backward])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
def test_fused_backends_take_the_cache_mask(backend: str, mode: str) -> None:
    """Fewer queries than keys, with an explicit [B, Tq, Tk] mask, as a KV-cache step passes it."""
    torch.manual_seed(3)
    inputs = [t.detach() for t in mode_inputs(mode, 2, 1, 3, 9)]
    mask = torch.rand(2, 3, 9, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[..., -1] = True  # every query sees at least itself
    reference = attention_op("reference", mode)(*inputs, AttentionMask(explicit=mask))
    torch.testing.assert_close(attention_op(backend, mode)(*inputs, AttentionMask(explicit=mask)), reference,
                               rtol=1e-10, atol=1e-10)


def last_queries(mode: str, inputs: list[torch.Tensor], n_queries: int) -> list[torch.Tensor]:
    """The inputs with only the last n_queries queries (and diff_v2's per-query lambda)."""
    q, k, v, *lam = inputs
    if mode == "diff_v2":
        lam = [lam[0][:, -n_queries:]]
    return [q[:, -n_queries:], k, v, *lam]


@pytest.mark.parametrize("backend", ["reference", "sdpa", "flex"])
@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize(("window", "packed"), [(None, None), (3, None), (7, None), (20, None), (None, "runs"),
                                                (4, "runs"), (None, "scattered"), (5, "scattered")])
def test_queries_after_earlier_keys_see_what_they_see_in_the_whole(backend: str, mode: str, window: int | None,
                                                                   packed: str | None) -> None:
    """The rule's queries are the last Tq of its Tk keys (a context-parallel rank's own positions after the earlier
    ones it receives): 4 queries against 9 keys give the whole sequence's last 4 rows, and the gradients of every
    key, value and lambda those rows reach (windows inside the 5 earlier keys, across them and longer than all 9;
    packed documents as runs and scattered, read for the keys)."""
    torch.manual_seed(7)
    inputs = [t.detach() for t in mode_inputs(mode, 2, 1, 9, 9)]
    documents = {None: None, "runs": torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2, 2], [0, 1, 1, 1, 1, 1, 1, 1, 2]]),
                 "scattered": scattered_documents(9, 3)}[packed]
    backward = backend != "flex"  # FlexAttention has no CPU backward
    results = []
    for offset_form in (False, True):
        leaves = [t.clone().requires_grad_(backward) for t in inputs]
        if offset_form:
            out = attention_op(backend, mode)(*last_queries(mode, leaves, 4), AttentionMask(window, documents))
        else:
            out = attention_op("reference", mode)(*leaves, AttentionMask(window, documents))[:, -4:]
        if backward:
            out.square().sum().backward()
        results.append([out] + [leaf.grad for leaf in leaves if backward])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mode", ["standard", "diff", "diff_v2"])
@pytest.mark.parametrize(("window", "packed", "n_queries"), [(3, None, 40), (6, "scattered", 40), (5, None, 29),
                                                            (8, "runs", 33)])
def test_cpu_sdpa_runs_a_short_window_in_query_blocks(mode: str, window: int, packed: str | None, n_queries: int,
                                                      monkeypatch) -> None:
    """With keys of at least a block and a window (blocks of 8 queries here, of mask.QUERY_BLOCK in use), each
    block of queries meets only the keys its window reaches, and values and gradients equal the reference's over
    the whole map: queries as many as the keys, and fewer (a context-parallel rank's)."""
    from moe_diff.kernels import mask as rule

    monkeypatch.setattr(rule, "QUERY_BLOCK", 8)
    torch.manual_seed(window)
    n_keys = 40
    inputs = last_queries(mode, [t.detach() for t in mode_inputs(mode, 2, 1, n_keys, n_keys)], n_queries)
    documents = {None: None, "scattered": scattered_documents(n_keys, window),
                 "runs": torch.arange(n_keys).div(11, rounding_mode="floor").expand(2, n_keys)}[packed]
    results = []
    for backend in ("reference", "sdpa"):
        leaves = [t.clone().requires_grad_() for t in inputs]
        calls = sdpa_blocks(monkeypatch)
        out = attention_op(backend, mode)(*leaves, AttentionMask(window, documents))
        out.square().sum().backward()
        results.append([out] + [leaf.grad for leaf in leaves])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    per_attention = math.ceil(n_queries / 8)
    assert len(calls) == per_attention * (2 if mode == "diff" else 1)
    assert [queries for queries, _ in calls[:per_attention]] == [8] * (n_queries // 8) + [n_queries % 8] * (
        n_queries % 8 > 0)
    assert all(keys <= queries + window - 1 for queries, keys in calls)


def test_cpu_sdpa_scores_every_key_where_a_block_sees_them_all(monkeypatch) -> None:
    """Fewer keys than a block and a window: one call over the dense mask; no window or a cache's mask: one too."""
    from moe_diff.kernels import mask as rule

    monkeypatch.setattr(rule, "QUERY_BLOCK", 8)
    q, k, v = (t.detach() for t in mode_inputs("standard", 2, 1, 11, 11))
    calls = sdpa_blocks(monkeypatch)
    for mask in (AttentionMask(4), AttentionMask(None, torch.zeros(2, 11, dtype=torch.long)),
                 AttentionMask(explicit=attention_mask(11, 11, 2, q.device).expand(2, 11, 11))):
        attention_op("sdpa", "standard")(q, k, v, mask)
    assert calls == [(11, 11)] * 3
    attention_op("sdpa", "standard")(q, k, v, AttentionMask(3))  # 11 keys: a block of 8 and a window of 3
    assert calls[3:] == [(8, 8), (3, 5)]
