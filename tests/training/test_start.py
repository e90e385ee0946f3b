"""Where a job starts (training/start.py): a run directory holds one run, a new run never starts over another's
checkpoints, only the run's own checkpoints are pruned, and no checkpoint that fails verification is deleted or
overwritten."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from helpers import assert_same_run, small_config  # tests/ is on the path

from moe_diff.checkpoint import CheckpointError
from moe_diff.checkpoint import training as checkpoints
from moe_diff.config import ConfigError
from moe_diff.runs import read_metrics
from moe_diff.train import train


def files(directory: Path) -> dict[str, str]:
    """Every file below `directory` by relative path, with the SHA-256 of its bytes."""
    return {str(path.relative_to(directory)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(directory.rglob("*")) if path.is_file()}


def test_a_new_run_is_refused_over_an_earlier_one_and_restart_moves_it_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(out))  # steps 3 and 6
    before = files(out / "checkpoints") | {"metrics.jsonl": files(out)["metrics.jsonl"]}
    with pytest.raises(ConfigError, match=r"train.resume='never' is not allowed .*step-3, step-6.*train.resume="
                                          r"restart to move that run to .*previous/N"):
        train(small_config(out, "train.resume=never", "train.max_steps=3"))
    assert files(out / "checkpoints") | {"metrics.jsonl": files(out)["metrics.jsonl"]} == before
    train(small_config(out, "train.resume=restart", "train.max_steps=3", "train.seed=1"))
    previous = out / "previous" / "1"
    assert files(previous / "checkpoints") | {"metrics.jsonl": files(previous)["metrics.jsonl"]} == before
    assert [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")] == ["step-3"]  # the new run's own
    train(small_config(tmp_path / "fresh", "train.max_steps=3", "train.seed=1"))
    assert_same_run(tmp_path / "fresh", out)  # metrics and the model every command opens are the new run's


def test_only_the_runs_own_checkpoints_are_pruned(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(out, "train.max_steps=2", "train.save_every=1", "train.keep_checkpoints=1"))
    foreign = out / "checkpoints" / "step-1"  # pruned already; put another run's checkpoint in its place
    shutil.copytree(out / "checkpoints" / "step-2", foreign)
    trainer_json = json.loads((foreign / "trainer.json").read_text()) | {"run_id": "another run"}
    (foreign / "trainer.json").write_text(json.dumps(trainer_json))
    checkpoints._write_manifest(foreign, 1)
    kept = files(foreign)
    train(small_config(out, "train.max_steps=4", "train.save_every=1", "train.keep_checkpoints=1"))
    assert [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")] == ["step-1", "step-4"]
    assert files(foreign) == kept


def test_when_no_checkpoint_verifies_the_job_stops_and_keeps_them(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(out))
    (out / "checkpoints" / "step-6" / "manifest.json").write_text("")  # weights intact, manifest empty
    shard = out / "checkpoints" / "step-3" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    before = files(out)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies, so the job neither resumes nor writes "
                                              r"over them: .*step-6.* malformed.*step-3 is damaged.*train.resume="
                                              r"restart moves these"):
        train(small_config(out, "train.max_steps=9"))
    assert files(out) == before
    with pytest.raises(CheckpointError, match="step-6.*malformed"):
        train(small_config(out, f"train.resume={out / 'checkpoints' / 'step-6'}"))
    assert files(out) == before
    train(small_config(out, "train.resume=restart"))
    assert files(out / "previous" / "1") == before
    assert [record["step"] for record in read_metrics(out / "metrics.jsonl")] == list(range(1, 7))  # the new run


def test_a_damaged_newest_checkpoint_is_set_aside_not_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(tmp_path / "whole", "train.max_steps=9"))
    train(small_config(out))
    (out / "checkpoints" / "step-6" / "manifest.json").write_text("{}")
    damaged = files(out / "checkpoints" / "step-6")
    train(small_config(out, "train.max_steps=9"))  # resumes step 3, as an uninterrupted run
    assert files(out / "checkpoints" / "damaged" / "step-6") == damaged
    assert_same_run(tmp_path / "whole", out)


def test_resuming_an_older_checkpoint_beside_newer_ones_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(out))
    before = files(out)
    with pytest.raises(ConfigError, match=r"holds step-6 \(a newer one of this run\).*another train.out_dir"):
        train(small_config(out, f"train.resume={out / 'checkpoints' / 'step-3'}", "train.max_steps=9"))
    with pytest.raises(ConfigError, match=r"train.resume='nowhere' is not allowed: no such directory"):
        train(small_config(out, "train.resume=nowhere"))
    assert files(out) == before
    result = train(small_config(tmp_path / "branch", f"train.resume={out / 'checkpoints' / 'step-3'}",
                                "train.max_steps=9"))
    assert result.step == 9 and files(out) == before


def test_checkpoints_written_before_run_ids_are_continued_as_one_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    train(small_config(out))
    for step in (3, 6):  # as an earlier version wrote them: no run id
        checkpoint = out / "checkpoints" / f"step-{step}"
        state = json.loads((checkpoint / "trainer.json").read_text())
        del state["run_id"]
        (checkpoint / "trainer.json").write_text(json.dumps(state))
        checkpoints._write_manifest(checkpoint, step)
    other = tmp_path / "other"  # a second directory of the same age: its id-less checkpoints are another run
    shutil.copytree(out, other)
    train(small_config(out, "train.max_steps=12", "train.keep_checkpoints=2"))
    assert [p.name for p in checkpoints.list_checkpoints(out / "checkpoints")] == ["step-9", "step-12"]
    result = train(small_config(out, f"train.resume={out / 'checkpoints' / 'step-12'}", "train.max_steps=13"))
    assert result.step == 13
    before = files(other)
    with pytest.raises(ConfigError, match=r"step-3 \(another run\), step-6 \(another run\)"):
        train(small_config(other, f"train.resume={out / 'checkpoints' / 'step-13'}", "train.max_steps=15"))
    assert files(other) == before


def test_the_metrics_of_a_run_that_saved_no_checkpoint_are_moved_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')  # killed before its first checkpoint
    train(small_config(out, "train.max_steps=2"))
    assert (out / "previous" / "1" / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'
    assert [record["step"] for record in read_metrics(out / "metrics.jsonl")] == [1, 2]
