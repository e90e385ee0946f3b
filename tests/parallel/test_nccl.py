"""The parity checks of the torchrun tests under NCCL on CUDA: expert, tensor, tensor x expert and fully sharded
data parallelism each equal one process on the same GPUs, step for step, and leave a run every command reads.
Skipped with fewer GPUs than a layout's processes; the same harness runs every layout on gloo in
test_train_parallel.py."""

import pytest
import torch
from harness import assert_layout_equals_one_process  # tests/parallel is on the path

LAYOUTS = [(2, ["parallel.ep=2"]), (2, ["parallel.tp=2", "model.n_kv_heads=4"]),
           (4, ["parallel.tp=2", "parallel.ep=2", "model.n_kv_heads=4"]),
           (2, ["parallel.data_parallel=fsdp", "train.grad_accum=2"])]


@pytest.mark.gpu
@pytest.mark.parametrize(("processes", "layout"), [
    pytest.param(*case, marks=pytest.mark.skipif(torch.cuda.device_count() < case[0],
                                                 reason=f"needs {case[0]} CUDA devices"))
    for case in LAYOUTS])
def test_nccl_runs_equal_one_process(tmp_path, processes: int, layout: list[str]) -> None:
    assert_layout_equals_one_process(tmp_path, processes, layout, "cuda")
