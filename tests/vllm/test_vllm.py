"""Every attention mode served by vLLM through this package's plugin: on vLLM's CPU build, a batch of prompts of
different lengths served together (continuous batching), past the sliding window, gives moe_diff.generate's
greedy tokens on the same exported weights in float32."""

import json
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import servable_model  # tests/ is on the path

from moe_diff.data import ByteTokenizer
from moe_diff.inference.generation import generate

GREEDY = Path(__file__).with_name("greedy.py")
NEW_TOKENS = 12


@pytest.mark.parametrize("attention", ["standard", "diff", "diff_v2"])
def test_vllm_serves_the_greedy_tokens_of_moe_diff(attention: str, vllm_python: Path, tmp_path: Path) -> None:
    from moe_diff.hf.export import save_hf

    model = servable_model(attention)
    save_hf(model, ByteTokenizer(), tmp_path / "exported")
    prompts = [torch.randint(0, 256, (length,), generator=torch.Generator().manual_seed(length)).tolist()
               for length in (3, 11, 20)]
    expected = [generate(model, torch.tensor([ids]), NEW_TOKENS)[0, len(ids):].tolist() for ids in prompts]
    argv = [str(vllm_python), str(GREEDY), str(tmp_path / "exported"), json.dumps(prompts), str(NEW_TOKENS),
            str(tmp_path / "served.json")]
    served = subprocess.run(argv, timeout=600, capture_output=True, text=True)
    assert served.returncode == 0, served.stderr[-3000:]
    assert json.loads((tmp_path / "served.json").read_text()) == expected
