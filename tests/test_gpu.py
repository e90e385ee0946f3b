"""The CUDA paths against the CPU-tested references: fused attention and grouped experts through the whole model
in float32 and bfloat16, and compiled CUDA-graph decode steps against eager generation (skipped without a GPU);
and how the session chooses between compiled and interpreted Triton kernels."""

import os

import pytest
import torch

from moe_diff.config import ModelConfig
from moe_diff.inference import generation
from moe_diff.inference.generation import generate, stream
from moe_diff.kernels.moe_decode import moe_experts_gemv
from moe_diff.model import MoEDiffTransformer

WHY_SKIPPED = ("needs a CUDA device" if not torch.cuda.is_available() else
               "TRITON_INTERPRET=1 interprets the Triton kernels and leaves their CUDA launches untuned: run with "
               "TRITON_INTERPRET=0 (the default where CUDA is)" if os.environ.get("TRITON_INTERPRET") == "1" else None)
needs_cuda = pytest.mark.skipif(WHY_SKIPPED is not None, reason=WHY_SKIPPED or "")
MODES = ["standard", "diff", "diff_v2"]


def test_the_tests_compile_triton_kernels_where_cuda_is_and_interpret_them_elsewhere() -> None:
    from interpret import triton_interpret  # tests/ is on the path

    assert triton_interpret({}, cuda_available=True) == "0"
    assert triton_interpret({}, cuda_available=False) == "1"
    for value in ("0", "1"):  # the environment's choice stands
        assert triton_interpret({"TRITON_INTERPRET": value}, cuda_available=True) == value
        assert triton_interpret({"TRITON_INTERPRET": value}, cuda_available=False) == value


def cuda_model(attention: str, dtype: torch.dtype = torch.float32, decisive: bool = False,
               **overrides) -> MoEDiffTransformer:
    """The model's own initialisation, or (decisive) large random weights, so greedy choices are never near-ties."""
    torch.manual_seed(0)
    values = dict(vocab_size=64, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, n_experts=4, top_k=2,
                  sliding_window=6, max_seq_len=128, attention=attention, rope_theta=100.0)
    model = MoEDiffTransformer(ModelConfig(**(values | overrides)))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if decisive and "norm" not in name:
                param.normal_(0, 0.1 if "lambda_q" in name or "lambda_k" in name else 0.3)
    return model.to("cuda", dtype)


def loss_and_grads(model: MoEDiffTransformer, tokens: torch.Tensor, documents: torch.Tensor,
                   skip: str | None = None) -> list[torch.Tensor]:
    """The loss and every gradient (float32), leaving out parameters whose name contains `skip`."""
    model.zero_grad()
    out = model(tokens, document_ids=documents)
    loss = out.logits.float().square().mean() + out.aux_loss
    loss.backward()
    return [loss.detach()] + [p.grad.float() for name, p in model.named_parameters()
                              if p.grad is not None and (skip is None or skip not in name)]


def relative_errors(got: list[torch.Tensor], truth: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.norm(g - t) / torch.linalg.norm(t) for g, t in zip(got, truth, strict=True)])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize(("attn_backend", "moe_backend"), [("sdpa", "grouped_mm"), ("flex", "grouped_mm"),
                                                           ("triton", "grouped_mm"), ("sdpa", "reference")])
def test_fused_backends_equal_the_reference_through_the_model(attention: str, attn_backend: str,
                                                              moe_backend: str) -> None:
    """Loss and every gradient, each as a whole tensor, in float32 (the lambda gradients sum many nearly
    cancelling terms at initialisation, hence 1e-3); in bfloat16 no further from the float32 truth than the
    reference backends in bfloat16 are, lambdas aside (their cancelling sums are noise in bfloat16)."""
    tokens = torch.randint(0, 64, (2, 37), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    documents = torch.arange(37, device="cuda").div(11, rounding_mode="floor").expand(2, 37)
    fused_backends = {"attn_backend": attn_backend, "moe_backend": moe_backend}
    truth = loss_and_grads(cuda_model(attention), tokens, documents)
    assert relative_errors(loss_and_grads(cuda_model(attention, **fused_backends), tokens, documents),
                           truth).max() < 1e-3
    truth = loss_and_grads(cuda_model(attention), tokens, documents, skip="lambda")
    reference = loss_and_grads(cuda_model(attention, torch.bfloat16), tokens, documents, skip="lambda")
    fused = loss_and_grads(cuda_model(attention, torch.bfloat16, **fused_backends), tokens, documents, skip="lambda")
    assert torch.all(relative_errors(fused, truth) <= 2 * relative_errors(reference, truth) + 1e-3)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("attn_backend", ["sdpa", "triton"])
def test_compiled_cuda_graph_decode_generates_the_eager_tokens(attention: str, rows: int, attn_backend: str,
                                                              monkeypatch) -> None:
    """One row's step (2 pairs for 4 experts) runs the two matrix-vector launches inside the graph, three rows'
    (6 pairs) every expert."""
    calls = []

    def counted(*args: torch.Tensor) -> torch.Tensor:
        calls.append(args[0].shape[0])  # while the graph is traced
        return moe_experts_gemv(*args)

    monkeypatch.setattr(generation, "moe_experts_gemv", counted)
    model = cuda_model(attention, decisive=True, attn_backend=attn_backend)
    prompts = [torch.randint(0, 64, (3 + 5 * row,), generator=torch.Generator().manual_seed(row)).cuda()
               for row in range(rows)]
    compiled = torch.stack(list(stream(model, prompts, 12, compile=True)), 1)
    assert torch.equal(compiled, generate(model, prompts, 12)[:, -12:])
    assert bool(calls) == (rows == 1)


@needs_cuda
@pytest.mark.parametrize("attention", MODES)
def test_a_step_that_does_not_log_never_waits_for_the_gpu(attention: str, tmp_path) -> None:
    """The trainer's non-logging step on CUDA (bf16 autocast, document ids, router losses, clipping, the non-finite
    check) under torch.cuda.set_sync_debug_mode('error'): any operation that waits for the device raises."""
    from helpers import small_config  # tests/ is on the path
    from rich.console import Console

    from moe_diff.parallel import runtime
    from moe_diff.training.trainer import Trainer

    cfg = small_config(tmp_path, f"model.attention={attention}", "train.device=cuda", "model.dim=128",
                       "model.ffn_dim=128", "model.head_dim=32")
    trainer = Trainer(cfg, Console(quiet=True), runtime.start(cfg.parallel, torch.device("cuda")))
    trainer.train_step(details=False)  # the first step builds what later steps reuse
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        trainer.train_step(details=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
