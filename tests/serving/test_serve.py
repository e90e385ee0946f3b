"""`moe-diff serve` on vLLM's CPU build: the OpenAI-compatible server answers with moe_diff.generate's greedy tokens,
listens on 127.0.0.1 only, refuses requests without the API key, stops cleanly on SIGINT, and a model the CPU
backend cannot run is refused before any engine starts."""

import contextlib
import ipaddress
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from helpers import VLLM_ENVIRONMENT, servable_model  # tests/ is on the path

from moe_diff.config import ModelConfig
from moe_diff.data import ByteTokenizer
from moe_diff.inference.generation import generate
from moe_diff.model import MoEDiffTransformer

ENVIRONMENT = {**os.environ, **VLLM_ENVIRONMENT}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(url: str, body: dict | None = None, key: str | None = None) -> dict:
    headers = {"Content-Type": "application/json"} | ({"Authorization": f"Bearer {key}"} if key else {})
    data = json.dumps(body).encode() if body is not None else None
    with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as response:
        return json.loads(response.read())


def listening_addresses(port: int) -> set[str]:
    """The local addresses with a socket listening on `port`, from the kernel's table (/proc/net/tcp and tcp6)."""
    found = set()
    for table in (Path("/proc/net/tcp"), Path("/proc/net/tcp6")):
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.add(str(ipaddress.ip_address(bytes.fromhex(address)[::-1])) if len(address) == 8 else address)
    return found


def test_the_server_answers_with_moe_diffs_tokens_on_loopback_only(vllm_python: Path, tmp_path: Path) -> None:
    from moe_diff.hf.export import save_hf

    model = servable_model("diff")
    save_hf(model, ByteTokenizer(), tmp_path / "tiny-diff")
    prompt = list(range(40, 52))
    expected = generate(model, torch.tensor([prompt]), 8)[0, len(prompt):].tolist()
    port = free_port()
    log = (tmp_path / "server.log").open("w")
    server = subprocess.Popen([str(vllm_python), "-m", "moe_diff.cli", "serve", str(tmp_path / "tiny-diff"), "--port",
                               str(port), "--api-key", "secret", "--", "--dtype", "float32", "--enforce-eager",
                               "--max-model-len", "128"], env=ENVIRONMENT, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)  # its own process group: vLLM's processes go with it
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                models = request(f"{base}/models", key="secret")
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, "the server did not start"
                time.sleep(1)
        assert [entry["id"] for entry in models["data"]] == ["tiny-diff"]
        body = {"model": "tiny-diff", "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logprobs": 0, "return_tokens_as_token_ids": True}
        tokens = request(f"{base}/completions", body, key="secret")["choices"][0]["logprobs"]["tokens"]
        assert [int(token.removeprefix("token_id:")) for token in tokens] == expected
        with pytest.raises(urllib.error.HTTPError, match="401"):
            request(f"{base}/completions", body)
        assert listening_addresses(port) == {"127.0.0.1"}  # not every interface, vLLM's own default
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=120) == 0
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    assert f"serving tiny-diff at http://127.0.0.1:{port}/v1" in " ".join((tmp_path / "server.log").read_text().split())
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_a_model_the_cpu_backend_cannot_run_is_refused_before_the_engine_starts(vllm_python: Path,
                                                                                tmp_path: Path) -> None:
    from moe_diff.hf.export import save_hf

    cfg = ModelConfig(vocab_size=257, dim=32, n_layers=1, n_heads=2, n_kv_heads=2, head_dim=16, ffn_dim=32,
                      n_experts=2, top_k=1, max_seq_len=64, attention="standard")
    save_hf(MoEDiffTransformer(cfg), ByteTokenizer(), tmp_path / "narrow")
    refused = subprocess.run([str(vllm_python), "-m", "moe_diff.cli", "serve", str(tmp_path / "narrow")],
                             env=ENVIRONMENT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2
    assert ("error: model.head_dim=16 cannot be served on a CPU: vLLM's CPU attention takes head widths 32, 64"
            in " ".join(refused.stderr.split()))
    assert "vllm" not in refused.stdout.lower()  # no engine, no server


def test_the_serving_benchmark_measures_every_mode(vllm_python: Path, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {vocab_size: 257, dim: 64, n_layers: 1, n_heads: 4, n_kv_heads: 2, head_dim: 32, "
                      "ffn_dim: 64, n_experts: 4, top_k: 2, sliding_window: 8, max_seq_len: 64}\n"
                      "train: {seq_len: 32}\n")
    argv = [str(vllm_python), str(Path(__file__).parents[2] / "benchmarks" / "serving.py"), str(config), "--out",
            str(tmp_path / "serving"), "--requests", "3", "--rounds", "2", "--concurrency", "2",
            "--prompt-tokens", "6", "--new-tokens", "4", "--modes", "standard", "diff",  # two engines: CI's time
            "--enforce-eager"]
    run = subprocess.run(argv, env=ENVIRONMENT, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "serving.json").read_text())
    assert list(results["modes"]) == ["standard", "diff"]
    for figures in results["modes"].values():
        assert figures["requests"] == 3 * 2 and figures["output_tokens_per_s"] > 0
        assert 0 < figures["itl_p50_s"] <= figures["itl_p90_s"] <= figures["itl_p99_s"]
    assert results["relative_to_standard"]["standard"]["output_tokens_per_s"] == 1.0
    assert set(results["relative_to_standard"]["diff"]) == {"output_tokens_per_s", "ttft_p50_s", "itl_p50_s"}
