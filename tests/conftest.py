"""Session setup. Triton kernels run compiled where a CUDA device is and under Triton's interpreter elsewhere (small
shapes on the CPU); TRITON_INTERPRET set in the environment wins. The variable must be set before anything imports
triton, which the package does on import (torch does not)."""

import os

import torch
from interpret import triton_interpret  # tests/ is on the path

os.environ["TRITON_INTERPRET"] = triton_interpret(os.environ, torch.cuda.is_available())
