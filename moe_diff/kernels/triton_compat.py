"""Triton where it is installed; elsewhere stand-ins, so that kernel modules still import and their PyTorch
references still run (launching a kernel then raises, naming what to install)."""

from types import SimpleNamespace

TRITON_MISSING = "this Triton kernel needs triton: pip install 'moe-diff[gpu]', or use the PyTorch reference"

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _Unlaunchable:
        """What @triton.jit makes of a kernel when Triton is missing: indexing it with a grid raises."""

        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            raise RuntimeError(TRITON_MISSING)

    triton = SimpleNamespace(jit=_Unlaunchable, cdiv=lambda a, b: -(-a // b),
                             next_power_of_2=lambda n: 1 << max(n - 1, 0).bit_length())
    tl = SimpleNamespace(constexpr=int, dtype=object, float32="float32", float64="float64")

__all__ = ["HAVE_TRITON", "TRITON_MISSING", "tl", "triton"]
