"""The loop-over-experts reference against a per-token sum written from the definition, and the
grouped-GEMM backend against the reference."""

import pytest
import torch
import torch.nn.functional as F

from moe_diff.kernels.moe_experts import (
    megablocks_available,
    moe_experts_auto,
    moe_experts_every,
    moe_experts_gathered,
    moe_experts_grouped_mm,
    moe_experts_megablocks,
    moe_experts_pairs,
    moe_experts_reference,
    moe_experts_sorted,
)


def test_weighted_sum_of_chosen_experts_including_idle_ones() -> None:
    torch.manual_seed(0)
    n, dim, ffn, experts = 6, 5, 7, 4
    x = torch.randn(n, dim, dtype=torch.float64)
    w1, w3 = torch.randn(experts, ffn, dim, dtype=torch.float64), torch.randn(experts, ffn, dim, dtype=torch.float64)
    w2 = torch.randn(experts, dim, ffn, dtype=torch.float64)
    ids = torch.tensor([[0, 2], [2, 0], [1, 2], [0, 1], [2, 1], [0, 2]])  # expert 3 gets no token
    weights = torch.rand(n, 2, dtype=torch.float64)
    out = moe_experts_reference(x, ids, weights, w1, w2, w3)
    for t in range(n):
        expected = sum(weights[t, s] * (w2[e] @ (F.silu(w1[e] @ x[t]) * (w3[e] @ x[t])))
                       for s, e in enumerate(ids[t].tolist()))
        torch.testing.assert_close(out[t], expected, rtol=0, atol=1e-12)
    w1.requires_grad_()
    moe_experts_reference(x, ids, weights, w1, w2, w3).sum().backward()
    assert torch.all(w1.grad[3] == 0) and w1.grad[:3].abs().sum() > 0


@pytest.mark.parametrize("op", [moe_experts_gathered, moe_experts_every, moe_experts_pairs,
                                 moe_experts_sorted])
@pytest.mark.parametrize("n", [1, 3, 9])
def test_decode_expert_paths_equal_the_reference(op, n: int) -> None:
    """The static-shape paths of compiled decode steps, and the two loops of CPU inference (pair by pair, sorted
    by expert); with 9 tokens on 5 experts, expert 4 stays idle."""
    torch.manual_seed(n)
    dim, ffn, experts = 6, 10, 5
    x = torch.randn(n, dim, dtype=torch.float64)
    w1, w3 = (torch.randn(experts, ffn, dim, dtype=torch.float64) for _ in range(2))
    w2 = torch.randn(experts, dim, ffn, dtype=torch.float64)
    ids = torch.stack([torch.randperm(experts - 1)[:2] for _ in range(n)])
    weights = torch.rand(n, 2, dtype=torch.float64)
    torch.testing.assert_close(op(x, ids, weights, w1, w2, w3), moe_experts_reference(x, ids, weights, w1, w2, w3),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("op", [moe_experts_reference, moe_experts_grouped_mm, moe_experts_auto, moe_experts_gathered,
                                moe_experts_every, moe_experts_pairs, moe_experts_sorted])
def test_every_path_leaves_out_the_pairs_dropped_for_capacity(op) -> None:
    """An expert id of E marks a pair dropped for capacity: outputs and gradients equal the reference's with each
    dropped pair run on expert 0 at weight 0 (their own weights, 1 here, do not count, and get no gradient); token 2
    loses both its pairs."""
    torch.manual_seed(0)
    n, dim, ffn, experts = 7, 16, 24, 4
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 4, torch.randn(experts, dim, ffn) / 4,
               torch.randn(experts, ffn, dim) / 4, torch.rand(n, 2)]
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(n)])
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    dropped[::3, 1] = dropped[2] = True
    tensors[4] = tensors[4].masked_fill(dropped, 1.0)
    results = []
    for run, run_ids, kept_weights in ((op, ids.masked_fill(dropped, experts), lambda w: w),
                                       (moe_experts_reference, ids.masked_fill(dropped, 0),
                                        lambda w: w.masked_fill(dropped, 0))):
        x, w1, w2, w3, weights = (t.clone().requires_grad_() for t in tensors)
        out = run(x, run_ids, kept_weights(weights), w1, w2, w3)
        out.square().sum().backward()
        results.append([out, x.grad, w1.grad, w2.grad, w3.grad, weights.grad])
    for got, expected in zip(*results, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.all(results[0][0][2] == 0) and torch.all(results[0][-1][dropped] == 0)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_the_reference_in_outputs_and_gradients(top_k: int, dtype: torch.dtype) -> None:
    """Including an expert that receives no token (its gradient must be exactly zero)."""
    torch.manual_seed(top_k)
    n, dim, ffn, experts = 11, 16, 24, 5
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 4, torch.randn(experts, dim, ffn) / 4,
               torch.randn(experts, ffn, dim) / 4, torch.rand(n, top_k)]
    ids = torch.stack([torch.randperm(experts - 1)[:top_k] for _ in range(n)])  # expert 4 is idle
    grad = torch.randn(n, dim)
    results = []
    for op in (moe_experts_reference, moe_experts_grouped_mm):
        x, w1, w2, w3, weights = (t.to(dtype).requires_grad_() for t in tensors)
        out = op(x, ids, weights, w1, w2, w3)
        out.backward(grad.to(dtype))
        results.append([out, x.grad, w1.grad, w2.grad, w3.grad, weights.grad])
    tolerance = {"rtol": 0, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, **tolerance)
    assert all(torch.all(g[4] == 0) for g in results[1][2:5])


@pytest.mark.skipif(not megablocks_available(), reason="needs CUDA and MegaBlocks with its grouped_gemm extension")
@pytest.mark.parametrize(("top_k", "drop"), [(1, False), (2, False), (2, True)])
def test_megablocks_matches_the_reference_on_the_gpu(top_k: int, drop: bool) -> None:
    """With `drop`, every third token's second pair is dropped for capacity (expert id E)."""
    torch.manual_seed(top_k)
    n, dim, ffn, experts = 37, 64, 96, 6
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 8, torch.randn(experts, dim, ffn) / 8,
               torch.randn(experts, ffn, dim) / 8, torch.rand(n, top_k)]
    ids = torch.stack([torch.randperm(experts - 1)[:top_k] for _ in range(n)]).cuda()  # the last expert is idle
    if drop:
        ids[::3, -1] = experts
    results = []
    for op in (moe_experts_reference, moe_experts_megablocks):
        x, w1, w2, w3, weights = (t.cuda().bfloat16().requires_grad_() for t in tensors)
        out = op(x, ids, weights, w1, w2, w3)
        out.float().square().sum().backward()
        results.append([out, x.grad, w1.grad, w2.grad, w3.grad, weights.grad])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got.float(), expected.float(), rtol=3e-2, atol=3e-2)


def test_megablocks_backend_names_what_to_install_when_missing() -> None:
    if megablocks_available():
        pytest.skip("MegaBlocks is installed here")
    from moe_diff.config import ConfigError, ModelConfig
    from moe_diff.model import MoEDiffTransformer

    with pytest.raises(ConfigError, match=r"model.moe_backend='megablocks'.*pip install 'moe-diff\[megablocks\]'"):
        MoEDiffTransformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                                       moe_backend="megablocks"))


def test_grouped_mm_outputs_and_gradients_repeat_bit_for_bit() -> None:
    """The combine sums each token's slots in a fixed order and no gather backward collides (on GPU too)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    n, dim, ffn, experts = 300, 32, 48, 8
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim), torch.randn(experts, dim, ffn),
               torch.randn(experts, ffn, dim), torch.rand(n, 2)]
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(n)]).to(device)
    runs = []
    for _ in range(2):
        x, w1, w2, w3, weights = (t.to(device).requires_grad_() for t in tensors)
        out = moe_experts_grouped_mm(x, ids, weights, w1, w2, w3)
        out.square().sum().backward()
        runs.append([out, x.grad, w1.grad, w2.grad, w3.grad, weights.grad])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_grouped_mm_refuses_float64() -> None:
    x = torch.randn(2, 8, dtype=torch.float64)
    w = torch.randn(2, 8, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="moe_backend='reference' for float64"):
        moe_experts_grouped_mm(x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), w, w, w)


def test_a_model_with_grouped_mm_experts_equals_the_reference_model() -> None:
    from moe_diff.config import ModelConfig
    from moe_diff.model import MoEDiffTransformer

    def build(backend: str) -> MoEDiffTransformer:
        torch.manual_seed(0)
        return MoEDiffTransformer(ModelConfig(vocab_size=40, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                                              ffn_dim=48, n_experts=4, top_k=2, moe_backend=backend))

    tokens = torch.randint(0, 40, (2, 9))
    outputs = []
    for model in (build("reference"), build("grouped_mm")):
        out = model(tokens)
        (out.logits.square().mean() + out.aux_loss).backward()
        outputs.append((out.logits, [p.grad for p in model.parameters()]))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-5)
    for got, expected in zip(outputs[1][1], outputs[0][1], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def test_the_package_works_without_triton() -> None:
    """Triton is a GPU extra: without it the package imports, grouped_mm runs on the PyTorch permutation, and
    launching a Triton kernel names what to install."""
    import subprocess
    import sys

    code = """
import sys
sys.modules["triton"] = None  # as if it were not installed
import torch
from moe_diff.config import ModelConfig
from moe_diff.kernels import moe_permute
from moe_diff.model import MoEDiffTransformer
model = MoEDiffTransformer(ModelConfig(vocab_size=16, dim=8, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=8,
                                       moe_backend="grouped_mm"))
assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 16)
try:
    moe_permute.permute_plan(torch.tensor([[0, 1]]), 2)
except RuntimeError as error:
    assert "pip install 'moe-diff[gpu]'" in str(error)
else:
    raise AssertionError("a Triton kernel launched without Triton")
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)


@pytest.mark.parametrize("grad", [False, True])
@pytest.mark.parametrize(("n", "dtype", "dim"), [(1, torch.float32, 16), (5, torch.float32, 16),
                                                 (20, torch.float32, 16), (20, torch.float64, 16),
                                                 (20, torch.float32, 12)])
def test_auto_takes_a_path_that_equals_the_reference(grad: bool, n: int, dtype: torch.dtype, dim: int) -> None:
    """A few tokens without autograd (grouped on the host), grouped_mm where its rules hold, the loop for float64
    or rows that are not whole 16-byte blocks: every choice gives the reference's outputs and gradients."""
    torch.manual_seed(n)
    experts, ffn = 4, 24
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 4, torch.randn(experts, dim, ffn) / 4,
               torch.randn(experts, ffn, dim) / 4, torch.rand(n, 2)]
    ids = torch.stack([torch.randperm(experts)[:2] for _ in range(n)])
    results = []
    for op in (moe_experts_reference, moe_experts_auto):
        args = [t.to(dtype).requires_grad_(grad) for t in tensors]
        with torch.set_grad_enabled(grad):
            out = op(args[0], ids, args[4], *args[1:4])
            if grad:
                out.square().sum().backward()
        results.append([out.detach()] + ([a.grad for a in args] if grad else []))
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_grouped_mm_under_autocast_multiplies_in_its_dtype() -> None:
    """As F.linear in the loop is cast by autocast, so are grouped_mm's rows and weights: bfloat16 products (its
    output is bfloat16; float32 ones would forgo a GPU's bfloat16 speed) and float32 gradients for float32
    weights, as close to the loop's as bfloat16 allows. (The loop, fed float32 rows, returns float32.)"""
    torch.manual_seed(0)
    n, dim, ffn, experts = 24, 16, 32, 4
    x = torch.randn(n, dim)
    weights = [(torch.randn(shape) / 4).requires_grad_() for shape in ((experts, ffn, dim), (experts, dim, ffn),
                                                                         (experts, ffn, dim))]
    ids, routing = torch.stack([torch.randperm(experts)[:2] for _ in range(n)]), torch.rand(n, 2)
    results = []
    for op in (moe_experts_reference, moe_experts_grouped_mm):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = op(x, ids, routing, *weights)
        out.float().square().sum().backward()
        results.append((out.dtype, out.detach().float(), [w.grad.clone() for w in weights]))
        for w in weights:
            w.grad = None
    (loop_dtype, loop_out, loop_grads), (dtype, out, grads) = results
    assert dtype == torch.bfloat16 and loop_dtype == torch.float32
    torch.testing.assert_close(out, loop_out, rtol=2e-2, atol=2e-2)
    for grad, loop_grad in zip(grads, loop_grads, strict=True):
        assert grad.dtype == torch.float32
        torch.testing.assert_close(grad, loop_grad, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("n", [1, 4, 20])
def test_auto_without_autograd_runs_under_autocast(n: int) -> None:
    """Eager decode and evaluation under bfloat16 autocast (one token pair by pair, more sorted by expert): each
    path's values as close to the loop's as bfloat16 allows."""
    torch.manual_seed(n)
    dim, ffn, experts = 16, 32, 4
    x = torch.randn(n, dim)
    w1, w3 = (torch.randn(experts, ffn, dim) / 4 for _ in range(2))
    w2 = torch.randn(experts, dim, ffn) / 4
    ids, routing = torch.stack([torch.randperm(experts)[:2] for _ in range(n)]), torch.rand(n, 2)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = moe_experts_auto(x, ids, routing, w1, w2, w3)
        expected = moe_experts_reference(x, ids, routing, w1, w2, w3)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2e-2, atol=2e-2)


def test_auto_compiles_in_float32() -> None:
    """grouped_mm's fake kernel takes bfloat16 alone, so a compiled float32 model (train.compile on a CPU) takes
    the loop: compiled forward and backward equal the eager reference."""
    torch.manual_seed(0)
    n, dim, ffn, experts = 12, 16, 24, 4
    tensors = [torch.randn(n, dim), torch.randn(experts, ffn, dim) / 4, torch.randn(experts, dim, ffn) / 4,
               torch.randn(experts, ffn, dim) / 4]
    ids, routing = torch.stack([torch.randperm(experts)[:2] for _ in range(n)]), torch.rand(n, 2)
    results = []
    for op in (moe_experts_reference, torch.compile(moe_experts_auto, fullgraph=False)):
        args = [t.clone().requires_grad_() for t in tensors]
        out = op(args[0], ids, routing, *args[1:])
        out.square().sum().backward()
        results.append([out.detach()] + [a.grad for a in args])
    for got, expected in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
