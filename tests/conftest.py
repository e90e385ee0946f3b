"""Session setup. Triton kernels run compiled where a CUDA device is and under Triton's interpreter elsewhere (small
shapes on the CPU); TRITON_INTERPRET set in the environment wins. The variable must be set before anything imports
triton, which the package does on import (torch does not)."""

import os
from collections.abc import Mapping

import torch


def triton_interpret(environ: Mapping[str, str], cuda_available: bool) -> str:
    """TRITON_INTERPRET for the session: the environment's, else "0" with a CUDA device (interpreted kernels leave
    the table of tuned CUDA launches empty, so a CUDA launch would find none) and "1" without one."""
    return environ.get("TRITON_INTERPRET", "0" if cuda_available else "1")


os.environ["TRITON_INTERPRET"] = triton_interpret(os.environ, torch.cuda.is_available())
