"""The scripts in benchmarks/ run at their CPU sizes, so CI exercises their code."""

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    """A benchmark script as a module; its folder on the path, as when it runs (they import each other)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def suite(tmp_path_factory) -> tuple[Path, str]:
    """One run of the GPU suite at its CPU size (every stage), its output folder and what it printed; the stages'
    own benchmarks are checked through it below."""
    out = tmp_path_factory.mktemp("suite")
    process = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--cpu-size", "--out", str(out)],
                             capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, process.stderr[-2000:]
    return out, process.stdout


def triton_version() -> str:
    import triton

    return triton.__version__


def stage_parts(out: Path, stage: str) -> dict:
    record = json.loads((out / f"cpu-{stage}.json").read_text())
    assert record["status"] == "ok", record["status"]
    assert record["environment"]["device"] == "cpu" and record["environment"]["commit"]
    return record["parts"]


def test_gpu_suite_writes_each_stage_a_summary_and_the_logs(suite) -> None:
    out, printed = suite
    stages = ["train-step", "attention", "decode", "moe", "tests", "multi-gpu"]
    assert sorted(path.name for path in out.iterdir()) == sorted(
        [f"cpu-{stage}.json" for stage in stages] + ["gpu-summary.json", "gpu-logs.tar.gz"])  # at most 8 come back
    summary = json.loads((out / "gpu-summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == stages and all(s["status"] == "ok" for s in summary["stages"])
    assert summary["elapsed_s"] <= summary["budget_s"]
    headlines = {h["name"]: h for s in summary["stages"] for h in s["headlines"]}
    assert headlines["tokens/s diff / standard"]["target"] == ">= 0.95"
    assert headlines["tests failed"] == {"name": "tests failed", "value": 0, "target": "0", "holds": True}
    assert headlines["multi-gpu skipped"]["value"] == 4  # no GPUs here
    if any("spill bytes/thread" in name for name in headlines):  # where Triton's NVIDIA backend compiles
        assert headlines["diff_v2 forward (128, 32, 8, 2) spill bytes/thread (Triton " + triton_version() + ")"][
            "value"] >= 0
    assert headlines["batch-1 decode speed-up over transformers, prompt 16"]["value"] > 0
    assert headlines["diff kernel / fastest alternative, window, seq 256"]["value"] is None  # no Triton kernel here
    with tarfile.open(out / "gpu-logs.tar.gz") as archive:
        names = archive.getnames()
    assert {f"logs/{stage}.log" for stage in stages} <= set(names) and "logs/decode/decode.md" in names
    assert "tokens/s diff / standard" in printed and "holds" in printed


def test_train_step_benchmark_at_cpu_size(suite) -> None:
    results = stage_parts(suite[0], "train-step")["train-step"]
    assert [row["system"] for row in results["rows"]] == ["standard", "diff", "diff_v2", "transformers"]
    assert all(row["tokens_per_s"] > 0 and row["tokens_per_step"] == 2 * 64 and row["mfu"] is None
               for row in results["rows"])  # no bf16 peak is known for a CPU
    assert set(results["ratios"]) == {"diff / standard", "diff_v2 / standard", "standard / transformers"}


def test_train_step_times_compiled_models_only_within_its_budget(tmp_path: Path) -> None:
    out = tmp_path / "train-step.json"
    argv = ["--cpu-size", "--compile", "--budget", "0", "--no-transformers", "--out", str(out)]
    assert load("train_step").main(argv) == 0
    results = json.loads(out.read_text())
    assert [row["system"] for row in results["rows"]] == ["standard", "diff", "diff_v2"]
    assert "budget went to the eager models" in results["compiled_skipped"]


def test_gpu_suite_starts_no_stage_that_would_not_fit(tmp_path: Path) -> None:
    assert load("gpu_suite").main(["--stages", "moe", "tests", "--budget", "30", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gpu-summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["moe", "tests"]
    assert all(s["status"].startswith("not started: its 60 s budget does not fit in the") for s in summary["stages"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["gpu-logs.tar.gz", "gpu-summary.json"]


def test_gpu_suite_goes_on_past_a_part_cut_short_and_a_stage_that_overruns(tmp_path: Path, monkeypatch) -> None:
    """A part left half written is named and the other parts' headlines kept; a stage past 1.5x its budget is
    interrupted with its whole process group (a child it started included) and the next stage still runs."""
    suite_module = load("gpu_suite")
    marker = tmp_path / "child-still-running"

    def cut_short(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
        return {"broken": [sys.executable, "-c", f"open({str(folder / 'broken.json')!r}, 'w').write('[1,')"],
                "moe": [sys.executable, "-c", "import json, sys; json.dump({'results': [{'pass': 'forward+backward', "
                        "'backend': 'grouped_mm', 'tokens': 4096, 'time_over_dense_floor': 1.1}]}, "
                        f"open({str(folder / 'moe.json')!r}, 'w'))"]}

    def overrun(folder: Path, cpu_size: bool, budget_s: float) -> dict[str, list[str]]:
        child = f"import time; time.sleep(6); open({str(marker)!r}, 'w')"
        parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(60)"
        return {"slow": [sys.executable, "-c", parent]}

    monkeypatch.setattr(suite_module, "STAGES", [
        suite_module.Stage("moe", 60, cut_short, suite_module.moe_headlines),
        suite_module.Stage("train-step", 60, overrun, suite_module.train_step_headlines),
        suite_module.Stage("tests", 60, cut_short, suite_module.moe_headlines)])
    monkeypatch.setattr(suite_module, "CPU_BUDGET_S", 2)
    monkeypatch.setattr(suite_module, "GRACE_S", 1)
    assert suite_module.main(["--cpu-size", "--out", str(tmp_path / "out")]) == 0
    summary = json.loads((tmp_path / "out" / "gpu-summary.json").read_text())
    first, slow, last = summary["stages"]
    assert first["status"] == "ok" and first["headlines"][0]["value"] == 1.1 and last["status"] == "ok"
    assert "broken" in json.loads((tmp_path / "out" / "cpu-moe.json").read_text())["unreadable_parts"]
    assert slow["status"] == "stopped after 3 s (1.5x its budget) in slow"
    time.sleep(6)
    assert not marker.exists()  # the child went with its group


def test_gpu_suite_names_the_packages_a_machine_lacks(tmp_path: Path, monkeypatch, capsys) -> None:
    suite_module = load("gpu_suite")
    monkeypatch.setattr(suite_module, "REQUIRED", ("torch", "no_such_package_here"))
    assert suite_module.main(["--out", str(tmp_path)]) == 2
    assert "lacks no_such_package_here" in capsys.readouterr().err and not any(tmp_path.iterdir())


def test_moe_layer_benchmark_at_cpu_size(suite) -> None:
    results = stage_parts(suite[0], "moe")["moe"]
    rows = {(r["backend"], r["pass"], r["tokens"]): r for r in results["results"]}
    assert {backend for backend, _, _ in rows} >= {"reference", "grouped_mm", "dense floor", "pairs", "sorted"}
    assert {kind for _, kind, _ in rows} == {"forward+backward", "forward"}
    assert {tokens for _, _, tokens in rows} == {1, 4, 16, 64, 512, 2048} and results["dim"] == 256
    assert all(r["seconds"] > 0 and r["tflops"] > 0 for r in rows.values())
    assert rows[("dense floor", "forward", 512)]["time_over_dense_floor"] == 1.0


def test_attention_benchmark_at_cpu_size(suite) -> None:
    parts = stage_parts(suite[0], "attention")
    for regime, window in (("no-window", None), ("window", 64)):
        results = parts[regime]
        assert results["settings"]["window"] == window
        rows = results["results"]
        assert {r["case"] for r in rows} >= {"diff / reference", "diff / sdpa", "diff_v2 / sdpa",
                                             "standard 2x heads / sdpa (yardstick)"}
        assert all(r["forward_s"] > 0 and r["forward_backward_s"] > 0 for r in rows)


def test_decode_stage_benchmarks_beside_transformers(suite) -> None:
    results = stage_parts(suite[0], "decode")["decode"]
    assert {run["system"] for run in results["runs"]} == {"moe-diff", "transformers"}
    assert results["bandwidth_bytes_per_s"]["peak"] > 0


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


def test_megablocks_build_script_says_what_is_missing(tmp_path: Path) -> None:
    """Without a CUDA toolkit it stops before building anything and says why; a wrong call prints its usage."""
    script = str(BENCHMARKS / "build_megablocks.sh")
    process = subprocess.run(["bash", script, "build", str(tmp_path)], capture_output=True, text=True, timeout=120)
    if "no CUDA toolkit" not in process.stdout:
        pytest.skip("a CUDA toolkit is installed here")
    assert process.returncode == 2
    process = subprocess.run(["bash", script, "install"], capture_output=True, text=True, timeout=60)
    assert process.returncode == 64 and "usage:" in process.stderr


def test_layouts_benchmark_runs_the_trainer_under_torchrun(tmp_path: Path) -> None:
    """DDP on 4 processes: no read of tensor values in a step that does not log, parameters + gradients + AdamW
    state exactly the formula's 16 bytes per parameter on each rank, and the save's SHA-256 reads only files."""
    out = tmp_path / "layouts.json"
    assert load("layouts").main(["--layouts", "ddp", "--no-old", "--rounds", "1", "--steps", "1",
                                 "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    this = row["this"]
    assert this["host_reads_per_step"] == [0, 0, 0, 0]
    assert this["resident_bytes_per_rank"] == row["formula_resident_bytes_per_rank"]
    assert 0 < this["sha256_bytes_per_save_per_rank"] < this["parameter_bytes_per_rank"] * 3  # files, not experts
