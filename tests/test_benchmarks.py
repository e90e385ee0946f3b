"""The scripts in benchmarks/ run at their CPU sizes, so CI exercises their code."""

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_layer_benchmark_at_cpu_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "moe.json"
    assert load("moe").main(["--cpu-size", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["backend"], r["tokens"]): r for r in results["results"]}
    assert {backend for backend, _ in rows} >= {"reference", "grouped_mm", "dense floor"}
    assert {tokens for _, tokens in rows} == {512, 2048} and results["dim"] == 256
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows.values())
    assert rows[("dense floor", 512)]["time_over_dense_floor"] == 1.0
    assert "x the dense floor" in capsys.readouterr().out


def test_attention_benchmark_at_cpu_size(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    assert load("attention").main(["--cpu-size", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["case"] for r in rows} >= {"diff / reference", "diff / sdpa", "diff_v2 / sdpa",
                                         "standard 2x heads / sdpa (yardstick)"}
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)
