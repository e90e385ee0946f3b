"""A training step that does not log reads no tensor value back to Python in a parallel job either, but for the
all-to-all's split sizes, once per MoE layer, with expert parallelism (a dropless exchange needs them on the
host)."""

import json
from pathlib import Path

import pytest
from harness import SETTINGS, corpus, run_script  # tests/parallel is on the path

N_LAYERS = int(next(setting for setting in SETTINGS if setting.startswith("model.n_layers=")).split("=")[1])


@pytest.mark.parametrize(("processes", "layout", "expected"), [
    (2, ["parallel.ep=2", "model.capacity_factor=1.5"], ["tolist"] * N_LAYERS),
    (4, ["parallel.data_parallel=fsdp", "parallel.tp=2", "model.n_kv_heads=4"], [])])
def test_reads_in_a_step_that_does_not_log(tmp_path: Path, processes: int, layout: list[str],
                                           expected: list[str]) -> None:
    out = tmp_path / "reads"
    out.mkdir()
    run_script(Path(__file__).with_name("read_probe.py"), processes, str(out), corpus(tmp_path), *layout)
    for rank in range(processes):
        assert json.loads((out / f"rank-{rank}.json").read_text()) == expected, f"rank {rank}"
