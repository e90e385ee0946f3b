"""The Triton differential flash attention against the float64 reference: outputs and the gradients of q, k, v
and lambda, for every mode, GQA ratio, window, packed documents, odd lengths and head widths; the explicit
cache mask; and the whole model (the four lambda vectors included).

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1); with TRITON_INTERPRET=0 on a CUDA
machine the same tests run compiled on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from helpers import scattered_documents  # noqa: E402  (tests/ is on the path)

pytest.importorskip("triton")

from moe_diff.config import ModelConfig  # noqa: E402
from moe_diff.kernels import attention_op, auto_backend  # noqa: E402
from moe_diff.kernels.diff_flash_attention import rule_bounds  # noqa: E402
from moe_diff.kernels.mask import AttentionMask  # noqa: E402
from moe_diff.model import MoEDiffTransformer  # noqa: E402

DEVICE = "cpu" if os.environ["TRITON_INTERPRET"] == "1" else "cuda"
MODES = ["standard", "diff", "diff_v2"]
INTERPRETER_BFLOAT16 = "Triton's interpreter (3.9) gets bfloat16 tl.dot wrong on the CPU; checked compiled on a GPU"
# (query heads per kv group, kv groups, window, packed documents, head width)
SHAPES = [(1, 2, None, False, 16), (2, 2, 5, True, 16), (4, 1, 50, False, 16), (2, 1, 8, True, 24),
          (1, 1, None, True, 8), (2, 1, 20, False, 64), (1, 1, None, True, 128)]  # and the widths models use


def mode_inputs(mode: str, ratio: int, groups: int, n: int, keys: int, d: int) -> list[torch.Tensor]:
    """Float64 q, k, v (and lambda) of one mode: n queries against `keys` keys."""
    generator = torch.Generator().manual_seed(ratio * 10 + groups + d)
    if mode == "diff":
        shapes = [(2, n, ratio * groups, 2, d), (2, keys, groups, 2, d), (2, keys, groups, 2 * d)]
    elif mode == "diff_v2":
        shapes = [(2, n, 2 * ratio * groups, d), (2, keys, groups, d), (2, keys, groups, d)]
    else:
        shapes = [(2, n, ratio * groups, d), (2, keys, groups, d), (2, keys, groups, d)]
    tensors = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in shapes]
    if mode == "diff":
        tensors.append(torch.tensor(0.37, dtype=torch.float64))
    elif mode == "diff_v2":
        tensors.append(torch.rand(2, n, ratio * groups, dtype=torch.float64, generator=generator))
    return tensors


def values_and_gradients(mode: str, backend: str, inputs: list[torch.Tensor], dtype: torch.dtype,
                         window: int | None = None, documents: torch.Tensor | None = None,
                         explicit: torch.Tensor | None = None, device: str = "cpu") -> list[torch.Tensor]:
    """Output and input gradients (float64, on the CPU) for a fixed random output gradient."""
    args = [t.detach().to(device, dtype).requires_grad_() for t in inputs]
    on_device = [None if t is None else t.to(device) for t in (documents, explicit)]
    out = attention_op(backend, mode)(*args, AttentionMask(window, *on_device))
    grad = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    out.backward(grad.to(device, dtype))
    return [out.double().cpu()] + [a.grad.double().cpu() for a in args]


def relative_errors(got: list[torch.Tensor], expected: list[torch.Tensor]) -> list[float]:
    return [((g - e).norm() / e.norm()).item() for g, e in zip(got, expected, strict=True)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ratio", "groups", "window", "packed", "d"), SHAPES)
def test_values_and_gradients_equal_the_float64_reference(mode: str, ratio: int, groups: int, window: int | None,
                                                          packed: bool, d: int) -> None:
    """37 tokens (a masked tail in every block size); windows shorter and longer than that; GQA 1, 2 and 4."""
    inputs = mode_inputs(mode, ratio, groups, 37, 37, d)
    documents = torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 34]) if packed else None
    expected = values_and_gradients(mode, "reference", inputs, torch.float64, window, documents)
    got = values_and_gradients(mode, "triton", inputs, torch.float32, window, documents, device=DEVICE)
    assert max(relative_errors(got, expected)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [
    pytest.param(torch.bfloat16, marks=pytest.mark.skipif(DEVICE == "cpu", reason=INTERPRETER_BFLOAT16)),
    torch.float16])
def test_half_precision_inputs_accumulate_in_float32(mode: str, dtype: torch.dtype) -> None:
    inputs = mode_inputs(mode, 2, 2, 33, 33, 32)
    expected = values_and_gradients(mode, "reference", inputs, torch.float64, 12, None)
    got = values_and_gradients(mode, "triton", inputs, dtype, 12, None, device=DEVICE)
    assert all(torch.isfinite(t).all() for t in got)
    assert max(relative_errors(got, expected)) < 2e-2


@pytest.mark.parametrize("mode", MODES)
def test_explicit_cache_mask_with_fewer_queries_than_keys(mode: str) -> None:
    """A KV-cache step: 3 queries against 21 cached keys under a [B, Tq, Tk] mask, every key block visited."""
    inputs = mode_inputs(mode, 2, 1, 3, 21, 16)
    mask = torch.rand(2, 3, 21, generator=torch.Generator().manual_seed(0)) > 0.4
    mask[..., -1] = True  # every query sees at least itself
    expected = values_and_gradients(mode, "reference", inputs, torch.float64, explicit=mask)
    got = values_and_gradients(mode, "triton", inputs, torch.float32, explicit=mask, device=DEVICE)
    assert max(relative_errors(got, expected)) < 1e-5


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("ratio", "groups", "window"), [(2, 1, None), (1, 2, 6), (4, 1, 20)])
def test_scattered_documents_equal_the_float64_reference(mode: str, ratio: int, groups: int,
                                                         window: int | None) -> None:
    """Document ids that return to a document after others (an attention_mask with a hole): keys are visible by
    equal ids, not by runs, in every block of 37 tokens, with and without a window."""
    inputs = mode_inputs(mode, ratio, groups, 37, 37, 16)
    documents = scattered_documents(37, ratio + 10 * groups)
    expected = values_and_gradients(mode, "reference", inputs, torch.float64, window, documents)
    got = values_and_gradients(mode, "triton", inputs, torch.float32, window, documents, device=DEVICE)
    assert max(relative_errors(got, expected)) < 1e-5


@pytest.mark.parametrize(("documents", "key_start", "query_stop"), [
    ([0, 0, 0, 1, 1, 1, 1, 2], [0, 0, 0, 3, 3, 3, 4, 7], [3, 3, 3, 6, 7, 7, 7, 8]),
    ([0, 0, 1, 1, 2, 2, 1, 3], [0, 0, 2, 2, 2, 3, 4, 7], [2, 2, 5, 6, 7, 7, 7, 8])])
def test_rule_bounds_fold_window_and_documents_into_one_lower_bound(documents: list[int], key_start: list[int],
                                                                    query_stop: list[int]) -> None:
    """Window 3. Document 1 returns after document 2, so document 2's queries (4, 5) bound their keys by document
    1's earlier start (2) instead of their own (4), or by their window: neither bound ever decreases along the row,
    so a query block's first query and a key block's last key bound the whole block (key j is seen only by queries
    j <= i < query_stop[j])."""
    mask = AttentionMask(3, torch.tensor([documents]))
    bounds = rule_bounds(8, 8, 1, mask.window, mask.document_starts(), torch.device("cpu"))
    assert [b.tolist() for b in bounds] == [[key_start], [query_stop]]
    # the last 5 queries alone: the same lower bounds, and each key's stop counted in those queries
    bounds = rule_bounds(5, 8, 1, mask.window, mask.document_starts(), torch.device("cpu"))
    assert bounds[0].tolist() == [key_start[3:]]
    assert bounds[1].tolist() == [[max(0, stop - 3) for stop in query_stop]]


@pytest.mark.parametrize("mode", MODES)
def test_the_whole_model_equals_the_reference_backend(mode: str) -> None:
    """Loss and every parameter's gradient (the four lambda vectors or lambda_proj included), packed documents
    (one row's around a hole), a window, head width 8 (padded to the kernel's 16 in registers)."""
    values = dict(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, ffn_dim=16, n_experts=4,
                  top_k=2, sliding_window=6, max_seq_len=64, attention=mode, rope_theta=100.0)
    results = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = MoEDiffTransformer(ModelConfig(**values, attn_backend=backend)).to(DEVICE)
        tokens = torch.randint(0, 40, (2, 19), generator=torch.Generator().manual_seed(1)).to(DEVICE)
        documents = torch.tensor([[0] * 7 + [1] * 12, [1] * 5 + [0] * 4 + [1] * 10]).to(DEVICE)  # a hole
        out = model(tokens, document_ids=documents)
        (out.logits.square().mean() + out.aux_loss).backward()
        results.append({"loss": out.logits.detach()} | {name: p.grad for name, p in model.named_parameters()})
    assert mode == "standard" or any("lambda" in name for name in results[1])
    for name, expected in results[0].items():
        torch.testing.assert_close(results[1][name], expected, rtol=1e-4, atol=1e-6, msg=name)


def test_float64_and_auto_choices() -> None:
    inputs = mode_inputs("diff", 1, 1, 5, 5, 16)
    with pytest.raises(ValueError, match="attn_backend='triton' runs float32, bfloat16 or float16"):
        attention_op("triton", "diff")(*inputs, AttentionMask())
    assert auto_backend(inputs[0], 5, AttentionMask()) == "sdpa"  # on the GPU too: SDPA's fastest case
    on_gpu = "triton" if inputs[0].is_cuda else "sdpa"
    assert auto_backend(inputs[0], 5, AttentionMask(4)) == on_gpu
    assert auto_backend(inputs[0], 5, AttentionMask(5)) == "sdpa"
    assert auto_backend(inputs[0], 3, AttentionMask(4)) == "sdpa"  # three keys: the window hides none of them
    assert auto_backend(inputs[0], 5, AttentionMask(document_ids=torch.zeros(1, 5, dtype=torch.long))) == on_gpu
    torch.testing.assert_close(attention_op("auto", "diff")(*inputs, AttentionMask()),
                               attention_op("reference", "diff")(*inputs, AttentionMask()), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("window", "explicit"), [(None, False), (6, False), (None, True)])
def test_diff_forward_split_over_its_values_equals_one_program(monkeypatch, window: int | None,
                                                               explicit: bool) -> None:
    """V1's forward with its 2d-wide values split across two programs per query block (each recomputing the
    scores, with half the accumulators): the same outputs and gradients as one program, bit for bit on the GPU
    (the interpreter's numpy products of 16 and of 32 value columns may round apart: OpenBLAS on AMD EPYC does)."""
    from moe_diff.kernels import diff_flash_attention as flash

    inputs = mode_inputs("diff", 2, 1, 21, 21, 16)
    mask = torch.rand(2, 21, 21, generator=torch.Generator().manual_seed(3)) < 0.7 if explicit else None
    if mask is not None:
        mask[..., 0] = True
    results = []
    for splits in (1, 2):
        monkeypatch.setattr(flash, "INTERPRETER_BLOCKS", (16, 16, 1, 1, splits))
        if DEVICE == "cuda":  # 32-wide values: the narrow candidates' autotuner
            only = flash.tuned("forward", ((64, 64, 4, 2, splits),))
            monkeypatch.setitem(flash.TUNED, ("forward", "diff", False), only)
        results.append(values_and_gradients("diff", "triton", inputs, torch.float32, window, explicit=mask,
                                            device=DEVICE))
    for split, whole in zip(*results, strict=True):
        if DEVICE == "cuda":
            assert torch.equal(split, whole)
        else:
            torch.testing.assert_close(split, whole, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("window", "packed"), [(None, None), (6, None), (30, None), (None, "runs"),
                                                (9, "runs"), (7, "scattered")])
def test_queries_after_earlier_keys_equal_the_float64_reference(mode: str, window: int | None,
                                                                packed: str | None) -> None:
    """The rule's queries as the last 13 of 37 keys (a context-parallel rank's own positions after those it
    receives): the key blocks before the queries are visited or skipped by the window and documents, in the
    forward and both backward kernels."""
    inputs = mode_inputs(mode, 2, 1, 13, 37, 16)
    documents = {None: None, "runs": torch.tensor([[0] * 10 + [1] * 20 + [2] * 7, [0] * 3 + [1] * 34]),
                 "scattered": scattered_documents(37, 4)}[packed]
    expected = values_and_gradients(mode, "reference", inputs, torch.float64, window, documents)
    got = values_and_gradients(mode, "triton", inputs, torch.float32, window, documents, device=DEVICE)
    assert max(relative_errors(got, expected)) < 1e-5
