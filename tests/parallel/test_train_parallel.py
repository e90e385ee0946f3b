"""The training job under torchrun (gloo on CPU): data and expert parallel runs equal one process step for step,
checkpoints move between layouts, a damaged expert table is refused, and a hung rank ends the job."""

import contextlib
import os
import pickle
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from harness import (  # tests/parallel is on the path
    CONFIGS,
    SETTINGS,
    assert_layout_equals_one_process,
    corpus,
    free_port,
    losses,
    run,
    weights,
)
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save, torch_save_to_dcp

from moe_diff import checkpoint, cli
from moe_diff.checkpoint import CheckpointError
from moe_diff.checkpoint import training as checkpoints
from moe_diff.config import load_config, to_yaml
from moe_diff.parallel import runtime
from moe_diff.train import train
from moe_diff.training.trainer import TrainingError


def writers(step: Path, key: str) -> dict[tuple[int, ...], str]:
    """Which file holds each saved piece of a tensor, by the piece's offsets in the whole tensor."""
    metadata = checkpoints.SafeFileSystemReader(step / "state").read_metadata()
    return {tuple(index.offset): info.relative_path for index, info in metadata.storage_data.items()
            if index.fqn == key}


@pytest.mark.parametrize(("processes", "layout"), [  # every dimension in one at least; test_gradients.py has more
    (2, ["parallel.tp=2", "parallel.vocab_parallel=true", "parallel.sequence_parallel=true", "model.n_kv_heads=4",
         "model.tie_embeddings=true"]),
    (2, ["parallel.data_parallel=ddp", "parallel.ep=2", "train.grad_accum=2"]),
    (2, ["parallel.data_parallel=fsdp", "train.grad_accum=2"]),
    (4, ["parallel.data_parallel=fsdp", "parallel.dp_replicate=2", "parallel.ep=2",
         "train.activation_checkpointing=moe"]),
    (4, ["parallel.data_parallel=fsdp", "parallel.tp=2", "parallel.ep=2", "parallel.vocab_parallel=true",
         "model.n_kv_heads=4"]),
    (4, ["parallel.ep=2", "parallel.cp=2", "train.eval_every=2"])])
def test_parallel_runs_equal_one_process(tmp_path: Path, processes: int, layout: list[str]) -> None:
    """The training job as users run it, in float32: losses and weights as one process's, then every command
    reads the run (test_gradients.py proves each layout's gradients, in float64)."""
    assert_layout_equals_one_process(tmp_path, processes, layout, "cpu")


def test_a_refused_layout_prints_one_line_on_every_rank(tmp_path: Path) -> None:
    """Under torchrun, a config the layout refuses gets the same one-line error as `moe-diff train`, no traceback."""
    config = tmp_path / "job.yaml"
    config.write_text(to_yaml(load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus(tmp_path)}"])))
    process = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                              f"--master_port={free_port()}", "-m", "moe_diff.train", str(config), "parallel.tp=2",
                              f"train.out_dir={tmp_path / 'out'}"], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert process.returncode != 0
    said = [line for line in process.stderr.splitlines() if "n_kv_heads=2" in line]
    assert said == ["error: parallel.tp=2 must split model.n_kv_heads=2 into whole differential heads (pairs) per "
                    "rank; parallel.tp that fit these shapes: 1"] * 2
    ranks = [line for line in process.stderr.splitlines() if re.match(r"\[rank\d\]", line)]
    assert not ranks and "moe_diff/parallel" not in process.stderr  # no rank's traceback


def resumed_from_step_3(tmp_path: Path, source: Path, processes: int, *overrides: str) -> Path:
    """A new run directory holding `source`'s step-3 checkpoint, run on to step 4."""
    resumed = tmp_path / f"resumed-{processes}-{len(list(tmp_path.glob('resumed-*')))}"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(source / "checkpoints" / "step-3", resumed / "checkpoints" / "step-3")
    return run(tmp_path, resumed.name, processes, *overrides)


def test_checkpoints_move_between_layouts_with_the_same_next_loss(tmp_path: Path) -> None:
    """ep=2 in two processes -> one process, -> FSDP x tp=2 x ep=2 with the vocabulary split in four, and -> cp=2 in
    two: each resumed step equals the original, and the run exports as one checkpoint."""
    parallel = run(tmp_path, "parallel", 2, "parallel.ep=2", "model.n_kv_heads=4")
    held = re.search(r"2 ranks: dp=2 tp=1 ep=2 \(ddp\); rank 0 holds ([\d.]+)M of the model's ([\d.]+)M",
                     (parallel / "console.txt").read_text())
    assert held and float(held[1]) < float(held[2])  # half of every layer's experts
    step = parallel / "checkpoints" / "step-3"  # each rank wrote its own experts, and its moments
    for key in ("model.layers.1.moe.experts.w2", "optimizer.state.layers.1.moe.experts.w2.exp_avg"):
        assert writers(step, key) == {(0, 0, 0): "__0_0.distcp", (2, 0, 0): "__1_0.distcp"}
    assert len(writers(step, "model.layers.1.attention.wq.weight")) == 1  # replicated: written once
    final = weights(parallel, 4)
    resumed = resumed_from_step_3(tmp_path, parallel, 1)
    sharded = resumed_from_step_3(tmp_path, parallel, 4, "parallel.data_parallel=fsdp", "parallel.tp=2",
                                  "parallel.ep=2", "parallel.vocab_parallel=true", "model.n_kv_heads=4")
    assert len(writers(sharded / "checkpoints" / "step-4", "model.layers.0.moe.experts.w1")) == 4  # 2 x 2 pieces
    context = resumed_from_step_3(tmp_path, parallel, 2, "parallel.cp=2")  # cp splits no weight
    for other in (resumed, sharded, context):
        assert losses(other) == pytest.approx(losses(parallel)[3:], rel=1e-5, abs=1e-6), other.name
        for name, value in weights(other, 4).items():
            torch.testing.assert_close(value, final[name], rtol=1e-4, atol=1e-4, msg=f"{other.name}: {name}")
    # the run exported as one checkpoint: its newest step, bit for bit
    assert cli.main(["export", str(parallel), str(tmp_path / "exported")]) == 0
    exported = checkpoint.load(tmp_path / "exported").state_dict()
    assert all(torch.equal(exported[name], value) for name, value in final.items())


def rewritten(step: Path, name: str, change: Callable[[Path], None]) -> Path:
    """A copy of a checkpoint with `change` applied to its state directory and the manifest recomputed (as a
    buggy writer would have made it), resumed in one process."""
    copy = step.parent / name
    shutil.copytree(step, copy)
    change(copy / "state")
    checkpoints._write_manifest(copy, 3)
    return copy


def test_checkpoints_with_an_expert_shard_lost_or_duplicated_are_refused(tmp_path: Path) -> None:
    """Rank 1's expert pieces dropped from the metadata: the coverage check refuses it. Rank 1's experts replaced
    by rank 0's, every piece present: only the expert table can tell."""
    out = run(tmp_path, "parallel", 2, "parallel.ep=2", "train.max_steps=3")
    step = out / "checkpoints" / "step-3"

    def drop_rank_1_experts(state: Path) -> None:
        metadata = checkpoints.SafeFileSystemReader(state).read_metadata()
        for key, entry in metadata.state_dict_metadata.items():
            if ".experts." in key and len(entry.size) == 3:
                entry.chunks = [chunk for chunk in entry.chunks if chunk.offsets[0] == 0]
        with (state / ".metadata").open("wb") as file:
            pickle.dump(metadata, file)

    def copy_rank_0_experts(state: Path) -> None:
        whole = state.parent / "whole.pt"
        dcp_to_torch_save(state, whole)
        saved = torch.load(whole, weights_only=False)
        for name in [n for n in saved["model"] if ".experts." in n]:
            saved["model"][name][2:] = saved["model"][name][:2]
        torch.save(saved, whole)
        shutil.rmtree(state)
        torch_save_to_dcp(whole, state)
        whole.unlink()

    for name, change, error in (("lost", drop_rank_1_experts, r"experts.w1 is written as 1 pieces covering"),
                                ("mixed", copy_rank_0_experts, r"layer 0 expert 2.*do not match their checksums")):
        copy = rewritten(step, name, change)
        cfg = load_config(copy / "config.yaml", [f"train.out_dir={tmp_path / name}", f"train.resume={copy}",
                                                 "parallel.ep=1"])
        with pytest.raises(CheckpointError, match=error):
            train(cfg)
        with pytest.raises(CheckpointError, match=error):
            checkpoint.open_model(copy)
    # a flipped byte in rank 1's file: of two ranks sharing the reading at resume, exactly one finds it
    damaged = step.parent / "damaged"
    shutil.copytree(step, damaged)
    shard = damaged / "state" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    found = []
    for share in ((0, 2), (1, 2)):
        with contextlib.suppress(CheckpointError):
            checkpoints.verify(damaged, share)
            found.append(share)
    assert len(found) == 1


def as_rank(rank: int, port: int) -> None:
    """Set the environment torchrun gives rank `rank` of a 2-process job."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


def slow_reading_rank(rank: int, port: int, config_yaml: str, results: "mp.Queue") -> None:
    """Rank 1 reads checkpoint metadata a second late; both ranks train and save."""
    as_rank(rank, port)
    if rank == 1:
        read_metadata = checkpoints.SafeFileSystemReader.read_metadata

        def late_read(self: checkpoints.SafeFileSystemReader) -> object:
            time.sleep(1)
            return read_metadata(self)
        checkpoints.SafeFileSystemReader.read_metadata = late_read
    try:
        train(load_config(config_yaml, []))
        results.put((rank, "done"))
    except Exception as error:  # noqa: BLE001 - reported to the test
        results.put((rank, repr(error)))


def test_a_rank_reading_a_save_late_still_finds_it(tmp_path: Path) -> None:
    """Rank 0 renames the new checkpoint only once every rank has read it back."""
    config = tmp_path / "job.yaml"
    out = tmp_path / "out"
    config.write_text(to_yaml(load_config(CONFIGS / "tiny.yaml", [
        *SETTINGS, f"data.source={corpus(tmp_path)}", "parallel.ep=2", "parallel.timeout_s=30",
        f"train.out_dir={out}"])))
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [context.Process(target=slow_reading_rank, args=(rank, port, str(config), results))
                 for rank in (0, 1)]
    for process in processes:
        process.start()
    try:
        outcomes = dict(results.get(timeout=300) for _ in processes)  # a failing rank ends the other's wait
    finally:
        for process in processes:
            process.join(timeout=30)
            process.kill()
    assert outcomes == {0: "done", 1: "done"}
    newest, skipped = checkpoints.newest_valid(out / "checkpoints")
    assert newest is not None and newest.name == "step-4" and not skipped


def hanging_rank(rank: int, port: int, config_yaml: str, errors: "mp.Queue") -> None:
    """Rank 1 joins the job, then stops answering; rank 0 trains and must fail within the timeout."""
    as_rank(rank, port)
    cfg = load_config(config_yaml, [])
    if rank == 1:
        runtime.start(cfg.parallel, torch.device("cpu"))
        time.sleep(30)
        return
    start = time.perf_counter()
    try:
        train(cfg)
        errors.put("no error")
    except TrainingError as error:
        errors.put(f"{time.perf_counter() - start:.1f} {error}")


def test_a_hung_rank_ends_the_job_with_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "job.yaml"
    cfg = load_config(CONFIGS / "tiny.yaml", [*SETTINGS, f"data.source={corpus(tmp_path)}", "parallel.timeout_s=3",
                                              f"train.out_dir={tmp_path / 'out'}"])
    config.write_text(to_yaml(cfg))
    context = mp.get_context("spawn")
    errors = context.Queue()
    port = free_port()
    processes = [context.Process(target=hanging_rank, args=(rank, port, str(config), errors)) for rank in (0, 1)]
    for process in processes:
        process.start()
    message = errors.get(timeout=120)
    for process in processes:
        process.kill()
    seconds, text = message.split(" ", 1)
    assert "parallel.timeout_s=3" in text and "another rank failed or hung" in text
    assert float(seconds) < 60
