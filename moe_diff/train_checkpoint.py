"""Training checkpoints that survive a kill: written aside, verified by a manifest, then renamed.

A checkpoint `OUT_DIR/checkpoints/step-N/` holds:
- `model/`: the model in the single-file schema (`moe_diff.checkpoint`: config.yaml + safetensors);
- `optimizer/`: the optimizer state, saved with torch.distributed.checkpoint;
- `trainer.json`: step, data position, RNG states and counters;
- `experts.json`: a SHA-256 of every expert of every layer (w1, w2 and w3 rows), checked at load, so that a
  checkpoint that lost or mixed up the experts of one rank of an expert-parallel job is refused;
- `config.yaml`: the whole resolved job config;
- `manifest.json`, written last: size and SHA-256 of every other file. A directory without
  it, or whose files do not match it, is refused.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moe_diff import checkpoint
from moe_diff.checkpoint import CheckpointError
from moe_diff.config import Config, DataConfig, to_yaml
from moe_diff.model import MoEDiffTransformer

MANIFEST = "manifest.json"
EXPERTS = "experts.json"
STEP_DIR = re.compile(r"^step-(\d+)$")


class _RestrictedUnpickler(pickle.Unpickler):
    """Loads torch.distributed.checkpoint's metadata and nothing else (no arbitrary callables)."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = (
            (module in ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
             and isinstance(getattr(__import__(module, fromlist=[name]), name, None), type))
            or (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)))
            or (module, name) == ("torch.serialization", "_get_layout")
            or (module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"))
        )
        if not allowed:
            raise pickle.UnpicklingError(f"optimizer metadata refers to {module}.{name}, which is not allowed")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """A FileSystemReader whose metadata unpickling is restricted to checkpoint metadata types."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        with self.fs.create_stream(self._get_metadata_path(kwargs.get("rank")), "rb") as file:
            metadata = _RestrictedUnpickler(file).load()
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST)


def _write_manifest(directory: Path, step: int) -> None:
    files = {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in _files(directory)}
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as file:
        json.dump({"step": step, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path) -> int:
    """The checkpoint's step, after checking every file against the manifest; CheckpointError if not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: {MANIFEST} is missing (a save was interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is malformed: {error}") from None
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is damaged: {name} is missing")
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            raise CheckpointError(f"{directory} is damaged: {name} does not match its checksum")
    return step


def _encode_rng() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def _restore_rng(state: dict[str, Any]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def expert_checksums(model: MoEDiffTransformer) -> dict[str, str]:
    """'layer L expert E' -> SHA-256 of that expert's w1, w2 and w3 rows (the whole model's)."""
    table = {}
    for layer, block in enumerate(model.layers):
        weights = [w.detach().cpu().contiguous() for w in (block.moe.experts.w1, block.moe.experts.w2,
                                                           block.moe.experts.w3)]
        for expert in range(weights[0].shape[0]):
            digest = hashlib.sha256()
            for w in weights:
                digest.update(w[expert].view(torch.uint8).numpy().tobytes())
            table[f"layer {layer} expert {expert}"] = digest.hexdigest()
    return table


def check_experts(directory: Path, model: MoEDiffTransformer) -> None:
    """Every expert of every layer is in the checkpoint's table, once, and its weights match it."""
    path = directory / EXPERTS
    if not path.is_file():
        raise CheckpointError(f"{directory} has no {EXPERTS} (the per-expert checksums): it was not written by "
                              "this version, or it is incomplete")
    stored, loaded = json.loads(path.read_text()), expert_checksums(model)
    missing = sorted(set(loaded) - set(stored))
    if missing or set(stored) != set(loaded):
        raise CheckpointError(f"{directory}: the expert table lists {len(stored)} experts, the model has "
                              f"{len(loaded)} ({', '.join(missing[:4]) or 'different names'} missing)")
    wrong = [name for name, digest in loaded.items() if stored[name] != digest]
    if wrong:
        raise CheckpointError(f"{directory}: {', '.join(wrong[:4])} do not match their checksums "
                              f"({len(wrong)} experts in all)")


def save(root: Path, step: int, model: MoEDiffTransformer, optimizer_state: dict[str, Any],
         trainer_state: dict[str, Any], config: Config, keep: int) -> Path:
    """Write `root/step-N` atomically, then delete all but the newest `keep` checkpoints. `model` is the whole
    model and `optimizer_state` its optimizer's state dict by parameter name (get_optimizer_state_dict's form),
    as one process holds them; in a job of several processes one rank writes them."""
    final, partial = root / f"step-{step}", root / f".step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    checkpoint.save(model, partial / "model")
    (partial / EXPERTS).write_text(json.dumps(expert_checksums(model), indent=1))
    with warnings.catch_warnings():  # single-process saves warn that no process group exists
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"optimizer": optimizer_state}, checkpoint_id=partial / "optimizer", no_dist=True)
    state = {**trainer_state, "step": step, "rng": _encode_rng()}
    (partial / "trainer.json").write_text(json.dumps(state, indent=1))
    (partial / "config.yaml").write_text(to_yaml(config))
    _write_manifest(partial, step)
    checkpoint.replace_directory(partial, final)  # an older save of this step stays until the swap
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Completed-looking step directories, oldest first (verification is separate)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def newest_valid(root: Path) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that verifies, and a note for each newer one that did not."""
    skipped = []
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
            return path, skipped
        except CheckpointError as error:
            skipped.append(str(error))
    return None, skipped


def load_model(directory: Path, model: MoEDiffTransformer) -> None:
    """Verify a checkpoint and copy its weights into the whole (not yet sharded) model."""
    verify(directory)
    checkpoint.load_weights_into(model, directory / "model")
    check_experts(directory, model)


def load_optimizer(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                   local: Callable[..., torch.Tensor] = lambda name, value, like=None: value,
                   whole: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, value: value) -> dict[str, Any]:
    """Restore the optimizer (of a model possibly sharded since: `whole` sizes each moment as saved, and
    `local(name, value, like)` takes this process's part, laid out like the current moment `like`) and the RNG
    states; return trainer.json."""
    current = get_optimizer_state_dict(model, optimizer)
    state = map_moments(current, whole)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"optimizer": state}, storage_reader=SafeFileSystemReader(directory / "optimizer"), no_dist=True)
    for name, moments in state["state"].items():
        for key, value in moments.items():
            if torch.is_tensor(value):
                moments[key] = local(name, value, like=current["state"][name][key])
    set_optimizer_state_dict(model, optimizer, state)
    trainer_state = json.loads((directory / "trainer.json").read_text())
    _restore_rng(trainer_state.pop("rng"))
    return trainer_state


def map_moments(state: dict[str, Any], fn: Callable[[str, torch.Tensor], torch.Tensor]) -> dict[str, Any]:
    """An optimizer state dict (by parameter name) with fn(name, tensor) applied to every per-parameter tensor."""
    moments = {name: {key: fn(name, value) if torch.is_tensor(value) else value for key, value in entry.items()}
               for name, entry in state["state"].items()}
    return {"state": moments, "param_groups": state["param_groups"]}


def resolve(path: Path) -> tuple[Path, Path | None, DataConfig | None]:
    """(model directory, run directory or None, the run's data config or None) for any checkpoint form:
    a `checkpoint.save` directory, a training checkpoint `step-N`, or a run's out_dir (its newest)."""
    if (path / checkpoint.CONFIG_FILE).is_file() and (path / checkpoint.WEIGHTS_FILE).is_file():
        return path, None, None
    if (path / "checkpoints").is_dir():
        newest, _ = newest_valid(path / "checkpoints")
        if newest is None:
            raise CheckpointError(f"{path} is a run directory without a valid checkpoint")
        path = newest
    if (path / "model").is_dir() and (path / "config.yaml").is_file():
        verify(path)
        data = yaml.safe_load((path / "config.yaml").read_text()).get("data", {})
        return path / "model", path.parent.parent, DataConfig(**data)
    raise CheckpointError(f"{path} is not a checkpoint, a training checkpoint or a run directory")
