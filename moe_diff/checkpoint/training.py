"""Training checkpoints that survive a kill: written aside, verified by a manifest, then renamed.

A checkpoint `OUT_DIR/checkpoints/step-N/` holds:
- `state/`: the model and optimizer state, saved with torch.distributed.checkpoint: every rank writes the pieces
  it holds (expert, tensor-parallel and FSDP shards placed in the whole tensors, replicated tensors once), and a
  load reads them into any layout, one process included;
- `experts.json`: a fingerprint of every expert of every layer (`experts.py`), checked at load, so that a
  checkpoint that lost or mixed up the experts of one rank of an expert-parallel job is refused;
- `trainer.json`: the run's id, step, data position and split, RNG states and counters;
- `tokenizer.json`: the tokenizer file of a run that does not train on bytes;
- `config.yaml`: the whole resolved job config (its model section builds the model);
- `manifest.json`, written last: size and SHA-256 of every other file. A directory without
  it, or whose files do not match it, is refused.
Before the manifest is written, the saved metadata must show every tensor covered by its pieces exactly once.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import math
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
from torch import nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from moe_diff.checkpoint import experts, schema
from moe_diff.checkpoint.schema import CheckpointError
from moe_diff.config import Config, to_yaml
from moe_diff.parallel.runtime import Runtime

MANIFEST = "manifest.json"
STATE = "state"
TRAINER_FILE = "trainer.json"
RUN_ID = "run_id"  # trainer.json's id of the run: a fresh run draws one, a resumed run keeps it
EARLIER_RUN = ""  # the id of checkpoints written before runs had ids: one run per directory, continued as such
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


def _file_entries(directory: Path, paths: list[Path]) -> dict[str, dict[str, Any]]:
    return {str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in paths}


def _write_manifest(directory: Path, step: int, known: dict[str, dict[str, Any]] | None = None) -> None:
    """manifest.json for every file of `directory`; `known` entries (hashed elsewhere) are taken as they are."""
    known = known or {}
    files = known | _file_entries(directory, [p for p in _files(directory)
                                              if str(p.relative_to(directory)) not in known])
    tmp = directory / (MANIFEST + ".tmp")
    with tmp.open("w") as file:
        json.dump({"step": step, "files": files}, file, indent=1)
        file.flush()
        os.fsync(file.fileno())
    os.replace(tmp, directory / MANIFEST)


def verify(directory: Path, share: tuple[int, int] = (0, 1)) -> int:
    """The checkpoint's step, after checking every file against the manifest; CheckpointError if not. With
    share=(i, n), every file's size but only the checksums of every n-th file from the i-th."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} is incomplete: {MANIFEST} is missing (a save was interrupted?)")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{manifest_path} is malformed: {error}") from None
    for index, (name, expected) in enumerate(sorted(files.items())):
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{directory} is damaged: {name} is missing")
        if path.stat().st_size != expected["bytes"] or (
                index % share[1] == share[0] and _sha256(path) != expected["sha256"]):
            raise CheckpointError(f"{directory} is damaged: {name} does not match its checksum")
    return step


def verify_in_job(directory: Path, runtime: Runtime) -> int:
    """verify() with the reading of the files split over the job's ranks; every rank raises the same error."""
    try:
        step, error = verify(directory, (runtime.rank, runtime.world_size)), None
    except CheckpointError as failure:
        step, error = -1, str(failure)
    errors = [error for error in runtime.gather_objects(error) if error]
    if errors:
        raise CheckpointError(errors[0])
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


def check_coverage(metadata: Metadata, source: Path) -> None:
    """Every saved tensor is covered by its pieces exactly once: none missing (a rank that wrote nothing) and
    none written twice (two ranks that thought they held the same shard)."""
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            continue
        boxes = [(chunk.offsets, chunk.sizes) for chunk in entry.chunks]
        covered = sum(math.prod(sizes) for _, sizes in boxes)
        overlap = any(all(a < c + d and c < a + b for a, b, c, d in zip(o1, s1, o2, s2, strict=True))
                      for (o1, s1), (o2, s2) in itertools.combinations(boxes, 2))
        if covered != math.prod(entry.size) or overlap:
            raise CheckpointError(f"{source}: {key} is written as {len(boxes)} pieces covering {covered} of its "
                                  f"{math.prod(entry.size)} elements{' with overlaps' if overlap else ''}: "
                                  "a rank's shards are missing or were written twice")


def _job_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """The model's tensors and the optimizer's per-parameter state as torch.distributed.checkpoint sees them: each
    the single-process tensor, as a DTensor where the job splits it (this rank's piece of it), sharing storage
    with the live tensors so that a load writes into them; and the optimizer's own state dict, which those
    tensors view. The optimizer's hyperparameters are the run's config and the step's learning rate, not state."""
    optimizer_state = get_optimizer_state_dict(model, optimizer)
    return {"model": {name: value.detach() for name, value in schema.model_state_dict(model).items()},
            "optimizer": {"state": optimizer_state["state"]}}, optimizer_state


def quiet_dcp(function: Callable, state: dict[str, Any], distributed: bool, directory: Path,
               **kwargs: Any) -> None:
    """dcp.save or dcp.load, over the job's ranks, or in one process without the warning that no group exists;
    what it refuses (a tensor missing or of another shape) raised as a CheckpointError naming `directory`."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            function(state, no_dist=not distributed, **kwargs)
        except CheckpointException as error:  # failures: rank -> (exception, traceback)
            reasons = sorted({str(failure[0]) for failure in error.failures.values()})
            raise CheckpointError(f"{directory}: {'; '.join(reasons)} (on ranks "
                                  f"{', '.join(map(str, sorted(error.failures)))})") from None


def save(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime,
         trainer_state: dict[str, Any], config: Config, keep: int, tokenizer_json: str | None = None) -> Path:
    """Write `root/step-N` atomically, then delete all but the newest `keep` checkpoints of this run (the one whose
    `run_id` trainer_state holds); a checkpoint of another run is never replaced or deleted. Every rank calls it
    and writes what it holds; rank 0 writes the rest. A shared filesystem is assumed for jobs over several nodes."""
    final, partial = root / f"step-{step}", root / f".step-{step}.partial"
    run = trainer_state[RUN_ID]
    if final.exists() and run_id(final) != run:  # every rank: all fail alike
        raise CheckpointError(f"{final} exists and was not written by this run; refusing to replace it")
    if runtime.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    runtime.barrier()
    state, _ = _job_state(model, optimizer)
    quiet_dcp(dcp.save, state, runtime.distributed, partial, checkpoint_id=partial / STATE)
    # Every rank reads `partial` before the collectives below, which rank 0 must pass before it renames it.
    check_coverage(SafeFileSystemReader(partial / STATE).read_metadata(), partial)  # every rank: all fail alike
    shards = sorted((partial / STATE).glob("*.distcp"))[runtime.rank::runtime.world_size]
    own_share = _file_entries(partial, shards)  # each rank reads its share of the files back
    table = experts.expert_table(model, runtime)
    rng = _encode_rng()
    hashed = {name: entry for entries in runtime.gather_objects(own_share) for name, entry in entries.items()}
    if runtime.is_main:
        experts.write(partial, table)
        (partial / TRAINER_FILE).write_text(json.dumps({**trainer_state, "step": step, "rng": rng}, indent=1))
        (partial / "config.yaml").write_text(to_yaml(config))
        schema.store_tokenizer(tokenizer_json, partial)  # as the job read it, whatever became of the file since
        _write_manifest(partial, step, hashed)
        schema.replace_directory(partial, final)  # an older save of this step stays until the swap
        for old in [path for path in list_checkpoints(root) if run_id(path) == run][:-keep]:
            shutil.rmtree(old)
    runtime.barrier()
    return final


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, runtime: Runtime) -> dict[str, Any]:
    """Read a (verified) checkpoint into the model and optimizer as this job lays them out, whatever layout
    wrote it; check the expert table; restore the RNG states; return trainer.json. Every rank calls it."""
    refuse_old_layout(directory)
    reader = SafeFileSystemReader(directory / STATE)
    check_coverage(reader.read_metadata(), directory)
    state, live_optimizer = _job_state(model, optimizer)
    quiet_dcp(dcp.load, state, runtime.distributed, directory, storage_reader=reader)
    set_optimizer_state_dict(model, optimizer, live_optimizer)
    experts.check(directory, model, runtime)
    trainer_state = json.loads((directory / TRAINER_FILE).read_text())
    _restore_rng(trainer_state.pop("rng"))
    return trainer_state


def list_checkpoints(root: Path) -> list[Path]:
    """Completed-looking step directories, oldest first (verification is separate)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.match(p.name) and p.is_dir()), key=step_of)


def step_of(path: Path) -> int:
    """The step of a checkpoint directory `step-N`."""
    return int(STEP_DIR.match(path.name).group(1))


def newest_valid(root: Path, runtime: Runtime | None = None) -> tuple[Path | None, dict[Path, str]]:
    """The newest checkpoint that verifies (the job's ranks sharing the reading), and why each newer one did not."""
    failed = {}
    for path in reversed(list_checkpoints(root)):
        try:
            verify_in_job(path, runtime) if runtime is not None else verify(path)
            return path, failed
        except CheckpointError as error:
            failed[path] = str(error)
    return None, failed


def run_id(directory: Path) -> str | None:
    """The id of the run that wrote a checkpoint (trainer.json's run_id; EARLIER_RUN where it has none), or None
    where trainer.json cannot be read: such a checkpoint belongs to no run, so no run prunes or replaces it."""
    try:
        state = json.loads((directory / TRAINER_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state.get(RUN_ID, EARLIER_RUN) if isinstance(state, dict) else None


def refuse_old_layout(path: Path) -> None:
    if (path / "model").is_dir() and not (path / STATE).is_dir():
        raise CheckpointError(f"{path} was written by an earlier version (model/ in the single-file schema), "
                              "which this version does not resume (start a new train.out_dir); its model is "
                              f"{path / 'model'}, which every other command reads as a checkpoint")
