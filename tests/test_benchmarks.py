"""The scripts in benchmarks/ run at their CPU sizes, so CI exercises their code."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    """A benchmark script as a module; its folder on the path, as when it runs (they import each other)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_moe_layer_benchmark_at_cpu_size(tmp_path: Path, capsys) -> None:
    out = tmp_path / "moe.json"
    assert load("moe").main(["--cpu-size", "--repeats", "1", "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    rows = {(r["backend"], r["pass"], r["tokens"]): r for r in results["results"]}
    assert {backend for backend, _, _ in rows} >= {"reference", "grouped_mm", "dense floor"}
    assert {kind for _, kind, _ in rows} == {"forward+backward", "forward"}
    assert {tokens for _, _, tokens in rows} == {1, 4, 16, 512, 2048} and results["dim"] == 256
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows.values())
    assert rows[("dense floor", "forward", 512)]["time_over_dense_floor"] == 1.0
    assert "x the dense floor" in capsys.readouterr().out


def test_attention_benchmark_at_cpu_size(tmp_path: Path) -> None:
    out = tmp_path / "attention.json"
    assert load("attention").main(["--cpu-size", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["case"] for r in rows} >= {"diff / reference", "diff / sdpa", "diff_v2 / sdpa",
                                         "standard 2x heads / sdpa (yardstick)"}
    assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)


def test_attention_launch_benchmark_at_cpu_size(tmp_path: Path) -> None:
    """Without a GPU it compiles the candidates for Hopper and records what they need; under the interpreter it
    also runs the timing code (a pool of spawned processes, so as a script, like the parallel benchmark)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton's NVIDIA backend compiles for GPUs")
    out = tmp_path / "blocks.json"
    process = subprocess.run([sys.executable, str(BENCHMARKS / "attention_blocks.py"), "--cpu-size", "--out",
                              str(out)], capture_output=True, text=True, timeout=600,
                             env={**os.environ, "TRITON_INTERPRET": "1"})
    assert process.returncode == 0, process.stderr[-2000:]
    results = json.loads(out.read_text())
    rows = results["results"]
    assert [(r["mode"], r["kernel"], r["launch"], r["default"]) for r in rows] == [
        ("diff_v2", "forward", [128, 64, 8, 3], True), ("diff_v2", "forward", [64, 64, 4, 2], False)]
    assert all(r["registers"] > 0 and r["shared_bytes"] > 0 and r["seconds"] > 0 for r in rows)
    assert results["compiled_for"] == "sm_90a" and list(results["best"]) == ["diff_v2 / forward"]
    assert "best diff_v2 / forward" in process.stdout


def test_attention_launch_benchmark_refuses_a_malformed_launch(capsys) -> None:
    with pytest.raises(SystemExit):
        load("attention_blocks").main(["--launches", "64,64,8"])
    assert "a launch is BLOCK_M,BLOCK_N,WARPS,STAGES" in capsys.readouterr().err


def test_parallel_benchmark_at_cpu_size(tmp_path: Path) -> None:
    """Run as a script: its ranks are spawned processes, which import it by its path."""
    out = tmp_path / "parallel.json"
    process = subprocess.run([sys.executable, str(BENCHMARKS / "parallel.py"), "--cpu-size", "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
    assert process.returncode == 0, process.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert [r["ranks"] for r in rows] == [1, 2]
    assert rows[0]["dispatch_overhead"] > 0 and rows[0]["scaling_efficiency"] == 1.0
    assert all(r["tokens_per_s"] > 0 and 0 < r["exchange_s_per_step"] < r["step_s"] for r in rows)
    # only routed rows travel: K rows of D floats per token out, the rows computed here back; never tokens x experts
    tokens_per_rank, dim, top_k, layers = 2 * 64, 64, 2, 2
    out_bytes = layers * tokens_per_rank * top_k * dim * 4  # float32
    assert rows[0]["exchange_bytes_per_step_per_rank"] == 2 * out_bytes  # one rank computes all it sends
    assert out_bytes < rows[1]["exchange_bytes_per_step_per_rank"] < 3 * out_bytes  # the busiest rank's share
    assert "dispatch overhead" in process.stdout
