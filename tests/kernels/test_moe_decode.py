"""The decode-step expert kernels (two launches of matrix-vector products) against the loop-over-experts reference,
and the compiled decode step's choice of them.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported);
with TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU.
"""

import os
import subprocess
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from moe_diff.inference.generation import decode_expert_op  # noqa: E402
from moe_diff.kernels import moe_decode  # noqa: E402
from moe_diff.kernels.moe_experts import (  # noqa: E402
    moe_experts_every,
    moe_experts_gathered,
    moe_experts_reference,
    moe_experts_sorted_op,
)

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
if INTERPRET and not isinstance(moe_decode._gate_up_kernel, InterpretedFunction):
    pytest.skip("triton was imported before this file set TRITON_INTERPRET=1: set it in the environment",
                allow_module_level=True)


@pytest.mark.parametrize(("n_tokens", "top_k", "drop"), [(1, 2, False), (3, 2, False), (2, 1, False), (3, 2, True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_experts_equal_the_reference(n_tokens: int, top_k: int, drop: bool, dtype: torch.dtype) -> None:
    """Widths that are not multiples of the blocks (40 and 72), an idle expert, a token whose two slots weigh
    differently; bfloat16 against the reference in float32 from the same bfloat16 weights. With `drop`, a pair
    dropped for capacity (id E, weight 1) adds nothing: the reference runs it on expert 0 at weight 0."""
    generator = torch.Generator().manual_seed(n_tokens * 10 + top_k)
    dim, ffn, experts = 40, 72, 5
    x = torch.randn(n_tokens, dim, generator=generator)
    w1, w3 = (torch.randn(experts, ffn, dim, generator=generator) / dim ** 0.5 for _ in range(2))
    w2 = torch.randn(experts, dim, ffn, generator=generator) / ffn ** 0.5
    ids = torch.stack([torch.randperm(experts - 1, generator=generator)[:top_k] for _ in range(n_tokens)])
    weights = torch.rand(n_tokens, top_k, generator=generator)
    dropped = torch.zeros_like(ids, dtype=torch.bool)
    dropped[1:, -1] = drop  # the first token keeps both pairs, the others their first
    tensors = [t.to(dtype) for t in (x, w1, w2, w3)]
    expected = moe_experts_reference(*(t.float() for t in tensors[:1]), ids.masked_fill(dropped, 0),
                                     weights.masked_fill(dropped, 0), *(t.float() for t in tensors[1:]))
    ids, weights = ids.masked_fill(dropped, experts), weights.masked_fill(dropped, 1.0)
    x_, w1_, w2_, w3_ = (t.to(DEVICE) for t in tensors)
    got = moe_decode.moe_experts_gemv(x_, ids.to(DEVICE), weights.to(DEVICE), w1_, w2_, w3_)
    assert got.dtype == dtype and got.shape == (n_tokens, dim)
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2 ** -7, "atol": 2e-2}
    torch.testing.assert_close(got.float().cpu(), expected, **tolerance)


@pytest.mark.parametrize(("device", "pairs", "expected"), [
    ("cuda", 4, moe_decode.moe_experts_gemv), ("cuda", 16, moe_experts_every),
    ("cpu", 4, moe_experts_gathered), ("cpu", 16, moe_experts_sorted_op)])
def test_compiled_decode_steps_take_the_gemv_kernels_on_a_gpu(device: str, pairs: int, expected) -> None:
    """With no more (token, slot) pairs than experts (8 here), a GPU's compiled step runs the two launches; more,
    every expert over its tokens; the CPU gathers the chosen experts, or runs the pairs sorted by expert as one
    operator."""
    assert decode_expert_op(device, pairs, 8, triton_available=True) is expected
    if device == "cuda":  # without Triton a GPU step gathers, as the CPU's does
        assert decode_expert_op(device, 4, 8, triton_available=False) is moe_experts_gathered


HOPPER_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from moe_diff.kernels import moe_decode
pointers = {"ids_ptr": "*i64", "hidden_ptr": "*fp32", "weights_ptr": "*fp32"}
for kernel in (moe_decode._gate_up_kernel, moe_decode._down_combine_kernel):
    names = kernel.arg_names
    signature = {name: "constexpr" if name.startswith("BLOCK") else pointers.get(name, "*bf16")
                 if name.endswith("_ptr") else "i32" for name in names}
    constants = {(names.index("BLOCK_ROWS"),): moe_decode.GPU_BLOCKS["rows"],
                 (names.index("BLOCK_COLS"),): moe_decode.GPU_BLOCKS["columns"]}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
    print(len(compiled.asm["cubin"]))
"""


def test_gemv_kernels_compile_for_hopper() -> None:
    """The two launches compile for sm_90 with the GPU's blocks on this machine (the interpreter never compiles)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend compiles for GPUs")
    environment = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    process = subprocess.run([sys.executable, "-c", HOPPER_COMPILE], capture_output=True, text=True, env=environment,
                             timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    assert [int(size) > 0 for size in process.stdout.split()] == [True, True]
