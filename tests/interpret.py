"""Whether the session runs Triton kernels under Triton's interpreter (no import of triton or of the package here:
conftest.py decides before either is imported)."""

from collections.abc import Mapping


def triton_interpret(environ: Mapping[str, str], cuda_available: bool) -> str:
    """TRITON_INTERPRET for the session: the environment's, else "0" with a CUDA device (interpreted kernels leave
    the table of tuned CUDA launches empty, so a CUDA launch would find none) and "1" without one."""
    return environ.get("TRITON_INTERPRET", "0" if cuda_available else "1")
