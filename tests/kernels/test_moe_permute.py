"""The Triton token permutation (plan, gather, combine) against its PyTorch references, in values and gradients,
and plan + gather + per-expert SwiGLU + combine against the loop-over-experts MoE reference.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported);
with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from moe_diff.kernels import moe_permute as mp  # noqa: E402
from moe_diff.kernels.moe_experts import moe_experts_reference  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if INTERPRET and not isinstance(mp._plan_kernel, InterpretedFunction):
    pytest.skip("triton was imported before this file set TRITON_INTERPRET=1: set it in the environment",
                allow_module_level=True)

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# combine against its reference: the interpreter rounds like PyTorch (bitwise equal) except float32 -> bfloat16,
# which it rounds toward zero (GPUs round to nearest), one bfloat16 ulp; compiled, fused multiply-adds may differ
TIGHT = {torch.float64: {"rtol": 1e-12, "atol": 1e-12}, torch.float32: {"rtol": 1e-6, "atol": 1e-6},
         torch.float16: {"rtol": 2 ** -10, "atol": 1e-5}, torch.bfloat16: {"rtol": 2 ** -7, "atol": 1e-5}}
if INTERPRET:
    TIGHT |= {dtype: {"rtol": 0, "atol": 0} for dtype in (torch.float64, torch.float32, torch.float16)}


def routing(n: int, top_k: int, n_experts: int, idle: int, seed: int, repeats: bool = False) -> torch.Tensor:
    """[n, top_k] expert ids that never pick the last `idle` experts; distinct per token unless `repeats`."""
    generator = torch.Generator().manual_seed(seed)
    busy = n_experts - idle
    if repeats:
        return torch.randint(0, busy, (n, top_k), generator=generator).to(DEVICE)
    return torch.stack([torch.randperm(busy, generator=generator)[:top_k] for _ in range(n)]).to(DEVICE)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE, dtype)


@pytest.mark.parametrize(("n", "top_k", "n_experts", "idle", "repeats", "block"), [
    (13, 1, 5, 1, False, 1024),
    (13, 2, 5, 2, False, 16),  # 26 pairs: two blocks, the second partial
    (37, 2, 8, 3, True, 16),  # a token may pick one expert twice
    (1, 2, 3, 1, False, 16),
])
def test_plan_equals_the_stable_argsort(n: int, top_k: int, n_experts: int, idle: int, repeats: bool, block: int,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "PLAN_BLOCK", block)
    ids = routing(n, top_k, n_experts, idle, seed=n, repeats=repeats)
    plan, expected = mp.permute_plan(ids, n_experts), mp.permute_plan_reference(ids, n_experts)
    for name, got, want in zip(mp.PermutePlan._fields, plan, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert torch.all(plan.counts[n_experts - idle:] == 0)
    assert torch.equal(ids.flatten()[plan.order], torch.repeat_interleave(torch.arange(n_experts, device=DEVICE),
                                                                          plan.counts))


def dropping(ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """ids with every third (token, slot) pair dropped for capacity (expert id n_experts)."""
    dropped = ids.clone()
    dropped.view(-1)[::3] = n_experts
    return dropped


@pytest.mark.parametrize("block", [1024, 16])
def test_plan_puts_the_dropped_pairs_after_every_group(block: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The groups hold the kept pairs only; the dropped ones follow the last group's end, in their flat order."""
    monkeypatch.setattr(mp, "PLAN_BLOCK", block)
    ids = dropping(routing(13, 2, 5, 1, seed=2), 5)
    plan, expected = mp.permute_plan(ids, 5), mp.permute_plan_reference(ids, 5)
    for name, got, want in zip(mp.PermutePlan._fields, plan, expected, strict=True):
        assert got.dtype == want.dtype and torch.equal(got, want), name
    kept = ids.flatten() < 5
    assert torch.equal(plan.counts, torch.bincount(ids.flatten()[kept], minlength=5))
    assert int(plan.offsets[-1]) == int(kept.sum())
    assert torch.equal(plan.order[int(kept.sum()):], torch.where(~kept)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_gather_and_combine_leave_the_dropped_pairs_out(dtype: torch.dtype) -> None:
    """A dropped pair's row is gathered as zeros and never read by the combine, whatever it holds (NaN here, as
    grouped GEMMs leave rows past their last group unset), forward and backward; against the sum over the kept
    pairs written from the definition, and against the references."""
    n, top_k, n_experts, dim = 9, 2, 4, 12
    ids = dropping(routing(n, top_k, n_experts, 0, seed=4), n_experts)
    plan = mp.permute_plan(ids, n_experts)
    end = int(plan.offsets[-1])
    ys = randn(n * top_k, dim, dtype=dtype, seed=2)
    ys[end:] = float("nan")
    grad_xs = randn(n * top_k, dim, dtype=dtype, seed=4)
    grad_xs[end:] = float("nan")
    grads = [grad_xs, randn(n, dim, dtype=dtype, seed=5)]
    results = []
    for gather, combine in ((mp.gather, mp.combine), (mp.gather_reference, mp.combine_reference)):
        x, y = randn(n, dim, dtype=dtype, seed=1).requires_grad_(), ys.clone().requires_grad_()
        weights = randn(n, top_k, dtype=dtype, seed=3).requires_grad_()
        xs, out = gather(x, plan), combine(y, plan, weights)
        torch.autograd.backward([xs, out], grads)
        results.append([xs, out, x.grad, y.grad, weights.grad])
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, got, want in zip(["xs", "out", "x.grad", "ys.grad", "weights.grad"], *results, strict=True):
        torch.testing.assert_close(got, want, **tolerance, msg=name)
    xs, out, x_grad, ys_grad, weights_grad = results[0]
    positions = plan.order.argsort().view(n, top_k)
    expected = torch.zeros(n, dim, dtype=dtype, device=DEVICE)
    for t, k in zip(*torch.where(ids < n_experts), strict=True):
        expected[t] += randn(n, top_k, dtype=dtype, seed=3)[t, k] * ys[positions[t, k]]
    torch.testing.assert_close(out, expected, **tolerance)
    assert torch.all(xs[end:] == 0) and torch.all(ys_grad[end:] == 0) and torch.all(weights_grad[ids == n_experts] == 0)
    assert bool(x_grad.isfinite().all())


def test_an_empty_batch() -> None:
    plan = mp.permute_plan(torch.zeros(0, 2, dtype=torch.int64, device=DEVICE), 4)
    assert plan.order.shape == (0,) and torch.all(plan.counts == 0) and torch.all(plan.offsets == 0)
    assert mp.gather(randn(0, 6), plan).shape == (0, 6)
    assert mp.combine(randn(0, 6), plan, randn(0, 2)).shape == (0, 6)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_copies_the_rows_exactly(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "MAX_BLOCK_D", 8)  # D = 20: three column blocks, the last partial
    ids = routing(11, 2, 5, 1, seed=1)
    plan = mp.permute_plan(ids, 5)
    x = randn(11, 20, dtype=dtype)
    assert torch.equal(mp.gather(x, plan), mp.gather_reference(x, plan))


@pytest.mark.parametrize("top_k", [1, 2, 4])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_combine_equals_the_reference_and_repeats_bitwise(dtype: torch.dtype, top_k: int,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mp, "MAX_BLOCK_D", 16)
    n, dim = 13, 19
    ids = routing(n, top_k, 6, 2, seed=top_k)
    plan = mp.permute_plan(ids, 6)
    ys = randn(n * top_k, dim, dtype=dtype, seed=1)
    weights_dtype = torch.float32 if top_k == 1 and dtype != torch.float64 else dtype  # float32 or ys's dtype
    weights = randn(n, top_k, dtype=weights_dtype, seed=2).abs()
    out = mp.combine(ys, plan, weights)
    assert out.dtype == dtype and out.shape == (n, dim)
    torch.testing.assert_close(out, mp.combine_reference(ys, plan, weights), **TIGHT[dtype])
    assert torch.equal(out, mp.combine(ys, plan, weights))


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradients_equal_the_references(dtype: torch.dtype, top_k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gather w.r.t. x; combine w.r.t. ys and the routing weights (kept in float32)."""
    monkeypatch.setattr(mp, "MAX_BLOCK_D", 8)  # D = 12: two column blocks, the second partial
    n, dim = 9, 12
    plan = mp.permute_plan(routing(n, top_k, 5, 1, seed=top_k), 5)
    inputs = [randn(n, dim, seed=1), randn(n * top_k, dim, seed=2), randn(n, top_k, seed=3).abs()]
    grads = [randn(n * top_k, dim, seed=4).to(dtype), randn(n, dim, seed=5).to(dtype)]
    results = []
    for gather, combine in ((mp.gather, mp.combine), (mp.gather_reference, mp.combine_reference)):
        x, ys = (t.to(dtype).requires_grad_() for t in inputs[:2])
        weights = inputs[2].clone().requires_grad_()
        xs, out = gather(x, plan), combine(ys, plan, weights)
        torch.autograd.backward([xs, out], grads)
        results.append([xs, out, x.grad, ys.grad, weights.grad])
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for name, got, want in zip(["xs", "out", "x.grad", "ys.grad", "weights.grad"], *results, strict=True):
        assert got.dtype == want.dtype, name
        torch.testing.assert_close(got, want, **tolerance, msg=name)


def test_gradcheck_in_float64() -> None:
    plan = mp.permute_plan(routing(4, 2, 4, 1, seed=5), 4)
    x = randn(4, 3, dtype=torch.float64).requires_grad_()
    ys = randn(8, 3, dtype=torch.float64, seed=1).requires_grad_()
    weights = randn(4, 2, dtype=torch.float64, seed=2).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: mp.gather(x, plan), (x,))
    assert torch.autograd.gradcheck(lambda ys, weights: mp.combine(ys, plan, weights), (ys, weights))


def permuted_swiglu(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                    w3: torch.Tensor) -> torch.Tensor:
    """The sparse SwiGLU layer as plan, gather, one matmul chain per expert's rows, combine."""
    plan = mp.permute_plan(ids, w1.shape[0])
    xs = mp.gather(x, plan)
    ends = plan.offsets.tolist()
    ys = []
    for expert, (start, end) in enumerate(zip([0, *ends[:-1]], ends, strict=True)):
        h = xs[start:end]
        ys.append(F.linear(F.silu(F.linear(h, w1[expert])) * F.linear(h, w3[expert]), w2[expert]))
    return mp.combine(torch.cat(ys), plan, weights)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_permuted_swiglu_layer_equals_the_expert_loop(dtype: torch.dtype) -> None:
    """Outputs and gradients, with two experts that receive no token (zero gradient for their weights)."""
    n, top_k, n_experts, dim, ffn = 10, 2, 6, 8, 12
    ids = routing(n, top_k, n_experts, 2, seed=7)
    tensors = [randn(n, dim, seed=1), randn(n_experts, ffn, dim, seed=2) / 3, randn(n_experts, dim, ffn, seed=3) / 3,
               randn(n_experts, ffn, dim, seed=4) / 3, randn(n, top_k, seed=5).softmax(-1)]
    grad = randn(n, dim, seed=6).to(dtype)
    results = []
    for op in (permuted_swiglu, moe_experts_reference):
        x, w1, w2, w3, weights = (t.to(dtype).requires_grad_() for t in tensors)
        out = op(x, ids, weights, w1, w2, w3)
        out.backward(grad)
        results.append([out, x.grad, weights.grad, w1.grad, w2.grad, w3.grad])
    tolerance = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name, got, want in zip(["out", "x", "weights", "w1", "w2", "w3"], *results, strict=True):
        torch.testing.assert_close(got, want, **tolerance, msg=name)
    assert all(torch.all(g[n_experts - 2:] == 0) for g in results[0][3:])


def test_launchers_reject_bad_inputs_with_clear_errors() -> None:
    ids = routing(6, 2, 4, 0, seed=0)
    plan = mp.permute_plan(ids, 4)
    ys, weights = randn(12, 5), randn(6, 2)
    with pytest.raises(ValueError, match="expert_ids must be int64"):
        mp.permute_plan(ids.int(), 4)
    with pytest.raises(ValueError, match=r"expert_ids must be int64 \[N, K\]"):
        mp.permute_plan(ids.flatten(), 4)
    with pytest.raises(ValueError, match="n_experts must be positive"):
        mp.permute_plan(ids, 0)
    with pytest.raises(ValueError, match="x must be"):
        mp.gather(torch.ones(6, 5, dtype=torch.int32, device=DEVICE), plan)
    with pytest.raises(ValueError, match="not top_k per token for 5 tokens"):
        mp.gather(randn(5, 5), plan)
    with pytest.raises(ValueError, match="plan.rows must be int64"):
        mp.gather(randn(6, 5), plan._replace(rows=plan.rows.int()))
    with pytest.raises(ValueError, match="ys must be"):
        mp.combine(ys.flatten(), plan, weights)
    with pytest.raises(ValueError, match=r"plan.order must be int64 of shape \(10,\)"):
        mp.combine(ys[:10], plan, randn(5, 2))
    with pytest.raises(ValueError, match=r"weights must be \[N, K\]"):
        mp.combine(ys, plan, weights.flatten())
    with pytest.raises(ValueError, match="weights must be floating"):
        mp.combine(ys, plan, torch.ones(6, 2, dtype=torch.int64, device=DEVICE))


@pytest.mark.parametrize("drop", [False, True])
def test_grouped_mm_through_the_triton_permutation_equals_the_reference(drop: bool,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped_mm backend as it runs on a GPU (Triton plan, gather and combine), here interpreted; with `drop`,
    every third pair is dropped for capacity."""
    from moe_diff.kernels import moe_experts

    monkeypatch.setattr(moe_experts, "permutation_ops", lambda device: (mp.permute_plan, mp.gather, mp.combine))
    torch.manual_seed(5)
    n, dim, ffn, experts = 13, 16, 24, 5
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 4, torch.randn(experts, dim, ffn) / 4,
               torch.randn(experts, ffn, dim) / 4, torch.rand(n, 2)]
    ids = routing(n, 2, experts, idle=1, seed=5).to(DEVICE)
    ids = dropping(ids, experts) if drop else ids
    results = []
    for op in (moe_experts.moe_experts_reference, moe_experts.moe_experts_grouped_mm):
        x, w1, w2, w3, weights = (t.to(DEVICE).requires_grad_() for t in tensors)
        out = op(x, ids, weights, w1, w2, w3)
        out.square().sum().backward()
        results.append([out, x.grad, w1.grad, w2.grad, w3.grad, weights.grad])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert all(torch.all(g[-1] == 0) for g in results[1][2:5])
