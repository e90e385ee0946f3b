"""The Triton attention kernels compile for Hopper on a machine without a GPU (the interpreter that runs them in
the other tests never compiles them): every mode's forward and backward kernels, onto warpgroup MMAs, within an
H100's shared memory and spilling little. Every launch a GPU's autotuning chooses from is compiled at each value
width the candidates are for with documents compared per key (HAS_DOCUMENTS: the variant that loads and compares
more, so the one that spills first); the hand-picked launches at head widths 64 and 128 without them, so that both
variants compile everywhere."""

import pytest

pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend compiles for GPUs")

from concurrent.futures import ThreadPoolExecutor  # noqa: E402

from moe_diff.kernels.diff_flash_attention import KERNELS, MODES  # noqa: E402
from moe_diff.kernels.gpu_compile import candidates, compile_in_process  # noqa: E402

H100_SHARED_BYTES = 227 * 1024  # the most one block may use
SPILL_BYTES = 64  # per thread, at most, for the candidates beyond the hand-picked one
# With packed documents each block also loads its queries' and keys' document ids and compares them: diff_v2's dQ
# kernel at (128, 64, 8, 3) then spills 88 bytes (48 without), every other added candidate at most 64. Its list
# still holds (64, 32, 8, 2) and (128, 32, 8, 2), which spill nothing, and the autotuner takes the spilling launch
# only where it times faster; the limit is the figure measured, so a further rise still fails.
DOCUMENT_SPILL_BYTES = {("diff_v2", "backward_q"): 88}


def compiled(*args: str) -> list[dict]:
    return compile_in_process(list(args), timeout=900)


WIDTHS = {"standard": [128], "diff": [64, 128], "diff_v2": [128]}  # every value width the candidates are for


@pytest.fixture(scope="module")
def hopper() -> dict[tuple[str, str, int, tuple[int, ...], bool], dict]:
    """Every compiled kernel by mode, kernel, head width, launch and documents; two compiling processes at once."""
    commands = [["--head-dim", str(head_dim), "--candidates", "--mode", mode, "--documents"]
                for mode, widths in WIDTHS.items() for head_dim in widths]
    commands += [["--head-dim", "64", "128"], ["--head-dim", "64", "--mode", "standard", "diff_v2", "--documents"]]
    with ThreadPoolExecutor(2) as pool:
        rows = [row for found in pool.map(lambda command: compiled(*command), commands) for row in found]
    return {(row["mode"], row["kernel"], row["head_dim"], tuple(row["launch"]), row["documents"]): row
            for row in rows}


@pytest.mark.parametrize("documents", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("mode", MODES)
def test_kernels_compile_for_hopper(hopper: dict, mode: str, kernel: str, head_dim: int, documents: bool) -> None:
    rows = [row for (m, k, d, _, docs), row in hopper.items() if (m, k, d, docs) == (mode, kernel, head_dim, documents)]
    assert len(rows) == (len(candidates(kernel, mode, head_dim)) if documents and head_dim in WIDTHS[mode] else 1)
    for row in rows:
        assert "error" not in row, row
        assert row["tensor_core_op"] == "wgmma"
        assert row["registers"] > 0 and 0 < row["shared_bytes"] <= H100_SHARED_BYTES


@pytest.mark.parametrize(("mode", "head_dim"), [(mode, head_dim) for mode, widths in WIDTHS.items()
                                                 for head_dim in widths])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_candidates_beyond_the_hand_picked_spill_little(hopper: dict, kernel: str, mode: str, head_dim: int) -> None:
    """The candidates added for autotuning spill at most 64 bytes per thread with documents, or what
    DOCUMENT_SPILL_BYTES allows (with Triton 3.9's compiler; a GPU's Triton may differ, and the GPU suite prints its
    figures)."""
    limit = DOCUMENT_SPILL_BYTES.get((mode, kernel), SPILL_BYTES)
    for launch in candidates(kernel, mode, head_dim)[1:]:
        assert hopper[mode, kernel, head_dim, tuple(launch), True]["stack_bytes"] <= limit, launch


def test_a_launch_that_does_not_compile_is_reported_not_raised() -> None:
    """Blocks must be powers of two: the row names the error and the command goes on."""
    (row,) = compiled("--mode", "diff", "--kernel", "forward", "--launch", "48", "64", "4", "2")
    assert row["launch"] == [48, 64, 4, 2] and "power of 2" in row["error"]


def test_the_offset_queries_variant_compiles_for_hopper() -> None:
    """Fewer queries than keys under the rule (a context-parallel rank's), with documents: every kernel of every mode
    compiles on warpgroup MMAs within shared memory (its spills are printed by the command, not bounded here)."""
    rows = compiled("--head-dim", "128", "--offset-queries", "--documents")
    assert len(rows) == len(MODES) * len(KERNELS)
    for row in rows:
        assert "error" not in row, row
        assert row["offset_queries"] and row["tensor_core_op"] == "wgmma"
        assert 0 < row["shared_bytes"] <= H100_SHARED_BYTES
