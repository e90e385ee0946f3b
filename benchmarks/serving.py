"""The cost of each attention mode inside one serving engine: for every mode, random weights at a config's shapes
(the same seed) are exported and served by `moe-diff serve` (vLLM's OpenAI-compatible server, this package's
plugin) on 127.0.0.1, all at once; in each of R rounds every server in turn, while the others are idle, is sent
the same N streaming completion requests, C at a time, from a pool of threads. Per mode: throughput (generated
tokens/s over its rounds), time to first token and inter-token latency percentiles. Bounded in requests and in
time.

CPU (what is committed):  python benchmarks/serving.py configs/bench-13m.yaml --out benchmarks/results/serving-cpu-13m
GPU:                      python benchmarks/serving.py configs/bench-13m.yaml --dtype bfloat16 --out serving-gpu
Needs vLLM in the environment (docs/serving.md).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil  # a dependency of vLLM, which this benchmark needs
import torch

from moe_diff.config import ATTENTION_MODES, load_config
from moe_diff.data import ByteTokenizer
from moe_diff.device import environment
from moe_diff.files import write_json
from moe_diff.hf.export import save_hf
from moe_diff.inference.bench.measure import percentile
from moe_diff.inference.bench.systems import wait_until_idle
from moe_diff.model import MoEDiffTransformer


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_up(base: str, server: subprocess.Popen, seconds: float, log: Path) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with urllib.request.urlopen(f"{base}/models", timeout=5):
                return
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(log.read_text().splitlines()[-20:])
                raise RuntimeError(f"the server did not start (exit status {server.poll()}):\n{tail}") from None
            time.sleep(1)


def stream_one(base: str, name: str, prompt: list[int], new_tokens: int) -> dict[str, Any]:
    """One streaming completion: the time to its first token, and the gap before each later token (a chunk that
    brings several tokens, as a server behind its client sends them, counts its gap once per token, divided)."""
    body = {"model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "logprobs": 0}  # each chunk lists its tokens
    request = urllib.request.Request(f"{base}/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json"})
    start, chunks = time.perf_counter(), []  # (arrival, tokens)
    with urllib.request.urlopen(request, timeout=600) as response:
        for line in response:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                choice = json.loads(line[len(b"data: "):])["choices"][0]
                chunks.append((time.perf_counter(), len(choice["logprobs"]["tokens"])))
    itls = [(b - a) / tokens for (a, _), (b, tokens) in itertools.pairwise(chunks) for _ in range(tokens)]
    return {"ttft": chunks[0][0] - start, "itls": itls, "tokens": sum(tokens for _, tokens in chunks)}


class Server:
    """`moe-diff serve` on one exported directory, on a free port of 127.0.0.1, its output in a log beside it."""

    def __init__(self, directory: Path, settings: argparse.Namespace):
        port, self.name = free_port(), directory.name
        self.base, self.log = f"http://127.0.0.1:{port}/v1", directory.with_suffix(".log")
        argv = [sys.executable, "-m", "moe_diff.cli", "serve", str(directory), "--port", str(port), "--",
                "--dtype", settings.dtype, "--max-model-len", str(settings.prompt_tokens + settings.new_tokens),
                *(["--enforce-eager"] if settings.enforce_eager else [])]
        with self.log.open("w") as log:
            self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def processes(self) -> list[psutil.Process]:
        """The server and the engine processes under it, for their CPU time."""
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.process.pid)
            return [root, *root.children(recursive=True)]
        return []

    def stop(self) -> None:
        """Interrupt the server and wait for it; kill its process group if it has not ended within a minute."""
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)  # the server and vLLM's processes under it


def send_round(server: Server, prompts: list[list[int]], settings: argparse.Namespace) -> dict[str, Any]:
    """The prompts as streaming requests to one server, `concurrency` at a time: each one's figures and the wall
    time of the whole round."""
    pool = concurrent.futures.ThreadPoolExecutor(settings.concurrency)
    try:
        start = time.perf_counter()
        done = list(pool.map(lambda prompt: stream_one(server.base, server.name, prompt, settings.new_tokens),
                             prompts, timeout=settings.time_limit))
        return {"done": done, "wall": time.perf_counter() - start}
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # past the time limit, requests in flight are left behind


def figures(rounds: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """One mode's rounds pooled: throughput over their summed wall time, time to first token and inter-token
    percentiles over every request."""
    done, wall = [r for one in rounds for r in one["done"]], sum(one["wall"] for one in rounds)
    ttfts, itls = [r["ttft"] for r in done], [gap for r in done for gap in r["itls"]]
    return {"requests": len(done), "concurrency": concurrency, "wall_s": wall,
            "output_tokens_per_s": sum(r["tokens"] for r in done) / wall,
            "ttft_p50_s": percentile(ttfts, 50), "ttft_p90_s": percentile(ttfts, 90),
            "itl_p50_s": percentile(itls, 50), "itl_p90_s": percentile(itls, 90), "itl_p99_s": percentile(itls, 99)}


def load_in_rounds(servers: dict[str, Server], settings: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Every mode's server up, warmed up on a prompt of its own; then `rounds` rounds in which each server in turn
    (each round beginning with the next) is sent the same `requests` prompts while the others are idle, so a drift
    of the machine touches every mode alike."""
    for server in servers.values():
        wait_until_up(server.base, server.process, settings.start_timeout, server.log)
    generator = torch.Generator().manual_seed(0)
    warmup, *prompts = [torch.randint(1, 256, (settings.prompt_tokens,), generator=generator).tolist()
                        for _ in range(settings.requests + 1)]
    for server in servers.values():
        stream_one(server.base, server.name, warmup, 4)  # the timed prompts find nothing of it cached
    modes, rounds = list(servers), {mode: [] for mode in servers}
    for round_index in range(settings.rounds):
        for turn in range(len(modes)):
            mode = modes[(round_index + turn) % len(modes)]
            wait_until_idle([process for server in servers.values() for process in server.processes()])
            rounds[mode].append(send_round(servers[mode], prompts, settings))
    return {mode: figures(rounds[mode], settings.concurrency) for mode in modes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a YAML config: the shapes every mode is served at")
    parser.add_argument("--out", required=True, help="output path without suffix: writes .json")
    parser.add_argument("--modes", nargs="+", choices=ATTENTION_MODES, default=list(ATTENTION_MODES))
    parser.add_argument("--requests", type=int, default=16, help="requests per mode and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each sending every mode its requests in turn")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--enforce-eager", action="store_true",
                        help="serve without vLLM's torch.compile: servers start sooner, steps run slower")
    parser.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to start")
    parser.add_argument("--time-limit", type=float, default=1800, help="seconds one round of one mode may take")
    settings = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # vLLM's CPU backend would reserve most free memory
    from vllm.platforms import current_platform  # where vLLM serves: what the environment record describes

    device = torch.device("cpu" if current_platform.is_cpu() else current_platform.device_type)
    results: dict[str, Any] = {"environment": environment(device), "settings": vars(settings), "modes": {}}
    with tempfile.TemporaryDirectory(prefix="moe-diff-serving-") as scratch:
        servers, configs = {}, {}
        try:
            for mode in settings.modes:
                configs[mode] = load_config(settings.config, [f"model.attention={mode}"]).model
                torch.manual_seed(0)
                directory = Path(scratch) / f"{Path(settings.config).stem}-{mode}"
                save_hf(MoEDiffTransformer(configs[mode]), ByteTokenizer(), directory)
                servers[mode] = Server(directory, settings)
            measured = load_in_rounds(servers, settings)
        finally:
            for server in servers.values():
                server.process.send_signal(signal.SIGINT)  # all at once, then each waited for
            for server in servers.values():
                server.stop()
        for mode, figures_of_mode in measured.items():
            results["modes"][mode] = figures_of_mode | {"model": vars(configs[mode])}
            print(mode, json.dumps(figures_of_mode), flush=True)
    baseline = results["modes"].get("standard")
    if baseline:
        results["relative_to_standard"] = {
            mode: {key: figures[key] / baseline[key] for key in ("output_tokens_per_s", "ttft_p50_s", "itl_p50_s")}
            for mode, figures in results["modes"].items()}
    print(f"wrote {write_json(results, Path(settings.out).with_suffix('.json'))}")


if __name__ == "__main__":
    main()
