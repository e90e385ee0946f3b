"""Session setup. Triton kernels run under Triton's interpreter on CPU (small shapes); the variable must be set
before anything imports triton, which the package does on import. Set TRITON_INTERPRET=0 on a GPU machine to
run the same tests compiled."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
