"""Every attention mode served by vLLM through this package's plugin: on vLLM's CPU build, a batch of prompts of
different lengths served together (continuous batching), past the sliding window (diff without one, and with
expert biases and tied embeddings; test_serve.py serves it with the window), gives moe_diff.generate's greedy
tokens on the same exported weights in float32; and the benchmark times vLLM beside moe-diff."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS, VLLM_ENVIRONMENT, servable_model  # tests/ is on the path

from moe_diff.data import ByteTokenizer
from moe_diff.inference.generation import generate

GREEDY = Path(__file__).with_name("greedy.py")
NEW_TOKENS = 12


@pytest.mark.parametrize(("attention", "overrides"), [
    ("standard", {}), ("diff_v2", {}),
    ("diff", {"expert_bias_rate": 0.01, "tie_embeddings": True, "sliding_window": None}),  # what else vLLM must get
], ids=["standard", "diff_v2", "diff-bias-tied-no-window"])  # diff with a window: test_serve.py's server
def test_vllm_serves_the_greedy_tokens_of_moe_diff(attention: str, overrides: dict, vllm_python: Path,
                                                   tmp_path: Path) -> None:
    from moe_diff.hf.export import save_hf

    model = servable_model(attention, **overrides)
    save_hf(model, ByteTokenizer(), tmp_path / "exported")
    prompts = [torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
               for length in (3, 11, 20)]
    expected = [generate(model, torch.tensor([ids]), NEW_TOKENS)[0, len(ids):].tolist() for ids in prompts]
    argv = [str(vllm_python), str(GREEDY), str(tmp_path / "exported"), json.dumps(prompts), str(NEW_TOKENS),
            str(tmp_path / "served.json")]
    served = subprocess.run(argv, env={**os.environ, **VLLM_ENVIRONMENT}, timeout=600, capture_output=True, text=True)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads((tmp_path / "served.json").read_text()) == expected


def test_the_benchmark_times_vllm_beside_moe_diff(vllm_python: Path, tmp_path: Path) -> None:
    argv = [str(vllm_python), "-m", "moe_diff.cli", "bench", str(CONFIGS / "tiny.yaml"), "model.n_layers=1",
            "model.dim=64", "model.head_dim=32", "model.max_seq_len=64", "train.seq_len=64", "--out",
            str(tmp_path / "bench"), "--batch", "1", "3", "--prompt", "5", "--new-tokens", "4", "--repeats", "1",
            "--systems", "moe-diff", "vllm"]
    bench = subprocess.run(argv, env={**os.environ, **VLLM_ENVIRONMENT}, timeout=600, capture_output=True,
                           text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    assert sorted((run["system"], run["batch"]) for run in runs) == [("moe-diff", 1), ("moe-diff", 3), ("vllm", 1),
                                                                      ("vllm", 3)]
    assert all(run["decode_tokens_per_s"] > 0 and run["gaps_timed"] == 3 for run in runs)
