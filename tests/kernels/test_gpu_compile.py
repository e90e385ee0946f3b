"""The Triton attention kernels compile for Hopper on a machine without a GPU (the interpreter that runs them in
the other tests never compiles them): every mode's forward and backward kernels, at head widths 64 and 128, with
the launch configurations a GPU uses, onto warpgroup MMAs and within an H100's shared memory."""

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend compiles for GPUs")

from moe_diff.kernels.diff_flash_attention import KERNELS, MODES  # noqa: E402
from moe_diff.kernels.gpu_compile import compile_in_process  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # the most one block may use


def compiled(*args: str) -> list[dict]:
    return compile_in_process(list(args), timeout=900)


@pytest.fixture(scope="module")
def hopper() -> dict[tuple[str, str, int], dict]:
    return {(row["mode"], row["kernel"], row["head_dim"]): row for row in compiled("--head-dim", "64", "128")}


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("mode", MODES)
def test_kernels_compile_for_hopper(hopper: dict, mode: str, kernel: str, head_dim: int) -> None:
    row = hopper[mode, kernel, head_dim]
    assert "error" not in row, row
    assert row["tensor_core_op"] == "wgmma"
    assert row["registers"] > 0 and 0 < row["shared_bytes"] <= H100_SHARED_BYTES


def test_a_launch_that_does_not_compile_is_reported_not_raised() -> None:
    """Blocks must be powers of two: the row names the error and the command goes on."""
    (row,) = compiled("--mode", "diff", "--kernel", "forward", "--launch", "48", "64", "4", "2")
    assert row["launch"] == [48, 64, 4, 2] and "power of 2" in row["error"]
