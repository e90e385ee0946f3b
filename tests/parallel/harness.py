"""What the torchrun tests share: the job at a tiny size on a real corpus, run in one process or under torchrun,
its losses and weights, and the check that a parallel layout equals one process and leaves a run every command
reads."""

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_diff import checkpoint, cli
from moe_diff.config import load_config, to_yaml
from moe_diff.runs import read_metrics

CONFIGS = Path(__file__).parents[2] / "configs"
SETTINGS = ["model.n_layers=2", "model.dim=32", "model.n_heads=4", "model.n_kv_heads=2", "model.head_dim=8",
            "model.ffn_dim=32", "model.n_experts=4", "model.sliding_window=16", "train.seq_len=32",
            "train.batch_size=4", "train.max_steps=4", "train.warmup_steps=1", "train.log_every=1",
            "train.eval_every=0", "train.save_every=3", "train.lr=1e-2",
            "data.val_fraction=0.3"]


def corpus(tmp_path: Path) -> str:
    """A small real corpus: a few of the standard library's own modules."""
    source = tmp_path / "corpus"
    source.mkdir(exist_ok=True)
    for name in ("json/decoder.py", "json/encoder.py", "json/scanner.py", "json/tool.py", "textwrap.py"):
        shutil.copy(Path(os.__file__).parent / name, source / name.replace("/", "_"))
    return str(source)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path: Path, name: str, processes: int, *overrides: str) -> Path:
    """`python -m moe_diff.train` in one process, or under torchrun with `processes` ranks."""
    out = tmp_path / name
    config = tmp_path / f"{name}.yaml"
    config.write_text(to_yaml(load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus(tmp_path)}"])))
    args = [str(config), f"train.out_dir={out}", *overrides]
    launcher = [sys.executable, "-m", "moe_diff.train"] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
        f"--master_port={free_port()}", "-m", "moe_diff.train"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.run([*launcher, *args], capture_output=True, text=True, env=environment, timeout=600)
    raised = [line for line in process.stderr.splitlines() if re.match(r"\[rank\d+\]: [\w.]*(Error|Exception)\b", line)]
    assert process.returncode == 0, "\n".join([*raised, process.stderr[-2000:]])
    (out / "console.txt").write_text(" ".join(process.stdout.split()))
    return out


def run_script(script: Path, processes: int, *args: str) -> None:
    """A script of tests/parallel, in one process or under torchrun, with tests/ and tests/parallel importable."""
    launcher = [sys.executable] if processes == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", f"--master_port={free_port()}"]
    path = os.pathsep.join([str(script.parent), str(script.parents[1]), os.environ.get("PYTHONPATH", "")])
    process = subprocess.run([*launcher, str(script), *args], capture_output=True, text=True, timeout=900,
                             env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path})
    assert process.returncode == 0, process.stderr[-3000:]


def losses(out: Path) -> list[float]:
    """The training loss of each step, then the validation losses (train.eval_every)."""
    records = read_metrics(out / "metrics.jsonl")
    return [record["loss"] for record in records] + [record["val_loss"] for record in records if "val_loss" in record]


def weights(out: Path, step: int) -> dict[str, torch.Tensor]:
    return checkpoint.open_model(out / "checkpoints" / f"step-{step}").model.state_dict()


def assert_close_runs(a: Path, b: Path, step: int) -> None:
    """Float32 rounding differs with the order of sums across ranks. Adam (lr 1e-2) divides each gradient by its
    own scale, so where a gradient is only rounding noise (an expert that got almost no tokens in a step) the
    noise moves single elements by up to ~lr per step; a wrong shard or sum changes the losses and moves every
    element by ~lr every step, so each tensor is compared as a whole: a loose check of the job as users run it,
    which test_gradients.py backs by comparing every gradient, in float64, to 1e-9."""
    assert losses(a) == pytest.approx(losses(b), rel=1e-5, abs=1e-6)
    weights_a, weights_b = weights(a, step), weights(b, step)
    for name, value in weights_a.items():
        error = (value - weights_b[name]).norm() / weights_b[name].norm()
        assert error < 1e-2, f"{name}: |Δ|/|w| = {error:.2e}"


def assert_layout_equals_one_process(tmp_path: Path, processes: int, layout: list[str], device: str) -> None:
    """The layout's job under torchrun (gloo on the CPU, NCCL on CUDA) equals one process on the same device and
    global batch, step for step, then its end-of-run summary and every command that reads its run directory work.

    The load-balancing loss of each micro-batch balances its tokens on every data-parallel rank together, so one
    process accumulates as many micro-batches as each rank does. On CUDA both run in float32, whose sums only the
    order across ranks changes."""
    on_device = [f"train.device={device}"] + (["train.precision=float32"] if device == "cuda" else [])
    same = [setting for setting in layout if setting.startswith(("model.", "train.grad_accum=", "train.eval_every="))]
    single = run(tmp_path, "single", 1, *on_device, "train.sample_tokens=0", *same)
    parallel = run(tmp_path, "parallel", processes, *on_device, *layout)  # with the default sample at its end
    assert len(read_metrics(parallel / "metrics.jsonl")) == 4
    assert_close_runs(parallel, single, 4)
    assert_commands_read(parallel, tmp_path)


def assert_commands_read(out: Path, tmp_path: Path) -> None:
    """The job's end-of-run summary (a sample, the routing table) ran in its layout, and every command that reads
    a run opens the one it wrote."""
    console = (out / "console.txt").read_text()
    assert "sample after step 4" in console and "Routing of" in console and "training loss" in console
    step_4 = out / "checkpoints" / "step-4"
    for argv in (["generate", str(out), "--prompt", "def ", "--max-new-tokens", "8"],
                 ["diagnose", str(out), "--out", str(tmp_path / "diagnosis"), "--tokens", "128", "--seq-len", "32"],
                 ["bench", str(out), "--out", str(tmp_path / "bench"), "--batch", "1", "--prompt", "8",
                  "--new-tokens", "4", "--repeats", "1", "--systems", "moe-diff"],
                 ["export", str(out), str(tmp_path / "exported")]):
        assert cli.main(argv) == 0, argv
    assert (tmp_path / "diagnosis" / "report.html").is_file() and (tmp_path / "bench.json").is_file()
    exported = checkpoint.load(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[name], value) for name, value in weights(out, 4).items())
    assert checkpoint.open_model(out).path == step_4
