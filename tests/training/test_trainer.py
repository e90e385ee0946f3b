"""The training job: loss falls, runs repeat bit for bit, and kills, signals and damage are survived."""

import copy
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import JSON_PACKAGE, assert_same_run, losses, small_config  # tests/ is on the path
from rich.console import Console

from moe_diff.checkpoint import CheckpointError, open_model
from moe_diff.checkpoint import training as checkpoints
from moe_diff.config import ConfigError, TrainConfig
from moe_diff.errors import DataError
from moe_diff.host_reads import counting_host_reads
from moe_diff.parallel import runtime
from moe_diff.runs import read_metrics
from moe_diff.train import train
from moe_diff.training import trainer as trainer_module
from moe_diff.training.job import training_job
from moe_diff.training.plots import plot_metrics
from moe_diff.training.trainer import Trainer, TrainingError


def test_loss_falls_on_the_builtin_corpus(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "data.source=builtin", "train.max_steps=40", "train.lr=5e-3", "train.eval_every=40",
                       "train.save_every=0", "train.batch_size=8", "train.log_every=1")
    result = train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert records[0]["loss"] > 5.0 and result.loss < 3.5 and result.val_loss < 3.5
    assert [r["step"] for r in records] == list(range(1, 41))


def test_metrics_carry_what_people_watch(tmp_path: Path) -> None:
    train(small_config(tmp_path, "model.attention=diff_v2"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "aux_loss", "z_loss", "tokens_per_s", "mfu", "peak_memory_bytes"):
        assert key in records[-1]
    assert records[2]["val_loss"] > 0 and "val_loss" not in records[1]
    assert len(records[-1]["load_imbalance"]) == len(records[-1]["dead_experts"]) == 2
    assert len(records[-1]["lambda"]) == 2 and all(0 < v < 1 for v in records[-1]["lambda"])
    assert records[0]["lr"] < records[1]["lr"]  # warmup
    png = plot_metrics(tmp_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_same_seed_gives_bitwise_identical_runs(tmp_path: Path) -> None:
    train(small_config(tmp_path / "a"))
    train(small_config(tmp_path / "b"))
    assert_same_run(tmp_path / "a", tmp_path / "b")
    train(small_config(tmp_path / "c", "train.seed=1"))
    assert losses(tmp_path / "c") != losses(tmp_path / "a")


KILLED_RUN = """
import os, signal, sys
from moe_diff.checkpoint import training as checkpoints
from moe_diff.config import load_config
from moe_diff.train import train
write_manifest = checkpoints._write_manifest
def dying_write(directory, step, *args):
    if step == 6:  # killed while writing the step-6 checkpoint, after steps 4-6 were logged
        os.kill(os.getpid(), signal.SIGKILL)
    write_manifest(directory, step, *args)
checkpoints._write_manifest = dying_write
train(load_config(sys.argv[1], sys.argv[2:]))
"""


def test_kill_during_save_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    train(small_config(tmp_path / "whole"))
    config_path = tmp_path / "killed.yaml"
    from moe_diff.config import to_yaml

    config_path.write_text(to_yaml(small_config(tmp_path / "killed")))
    process = subprocess.run([sys.executable, "-c", KILLED_RUN, str(config_path)], capture_output=True)
    assert process.returncode == -signal.SIGKILL
    checkpoints = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert checkpoints == [".step-6.partial", "step-3"]
    assert [r["step"] for r in read_metrics(tmp_path / "killed" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    result = train(small_config(tmp_path / "killed"))  # train.resume=auto
    assert result.step == 6
    assert_same_run(tmp_path / "whole", tmp_path / "killed")


def test_sigterm_saves_and_resume_continues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train(small_config(tmp_path / "whole", "train.save_every=0"))
    original = trainer_module.Trainer.train_step

    def step_then_signal(self, details):
        record = original(self, details)
        if self.step == 1:  # the second step is under way: as if the scheduler sent SIGTERM now
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_signal)
    result = train(small_config(tmp_path / "stopped", "train.save_every=0"))
    assert result.stop_reason == "signal" and result.step == 2
    assert (tmp_path / "stopped" / "checkpoints" / "step-2" / "manifest.json").is_file()
    monkeypatch.setattr(trainer_module.Trainer, "train_step", original)
    train(small_config(tmp_path / "stopped", "train.save_every=0"))
    assert_same_run(tmp_path / "whole", tmp_path / "stopped")


def test_a_resume_on_other_data_says_so(tmp_path: Path) -> None:
    """Each checkpoint records its data's split: resumed on the same files moved elsewhere, the run goes on as
    before and says nothing; on data with one more document, it says that validation losses do not compare."""
    shutil.copytree(JSON_PACKAGE, tmp_path / "data", ignore=shutil.ignore_patterns("__pycache__"))
    train(small_config(tmp_path / "run", f"data.source={tmp_path / 'data'}", "train.max_steps=3"))
    shutil.move(tmp_path / "data", tmp_path / "moved")
    said = []
    for source, steps in ((tmp_path / "moved", 4), (tmp_path / "moved", 5)):
        console = Console(record=True, width=400)
        train(small_config(tmp_path / "run", f"data.source={source}", f"train.max_steps={steps}"), console)
        said.append(console.export_text())
        (tmp_path / "moved" / "added.py").write_text("print('one more document')\n" * 50)
    assert "resumed from" in said[0] and "resuming:" not in said[0]
    assert "the data differs from the data" in said[1] and "do not compare" in said[1]
    trainer_file = tmp_path / "run" / "checkpoints" / "step-5" / "trainer.json"
    state = json.loads(trainer_file.read_text())
    del state["data_split"]  # as an older version wrote it
    trainer_file.write_text(json.dumps(state))
    checkpoints._write_manifest(trainer_file.parent, 5)
    console = Console(record=True, width=400)
    train(small_config(tmp_path / "run", f"data.source={tmp_path / 'moved'}", "train.max_steps=6",
                       "train.resume=" + str(trainer_file.parent)), console)
    assert "does not record its data's split" in console.export_text()


def test_damaged_checkpoint_is_refused_and_the_previous_one_used(tmp_path: Path) -> None:
    train(small_config(tmp_path / "whole", "train.max_steps=9"))
    train(small_config(tmp_path / "run", "train.max_steps=6"))
    newest = tmp_path / "run" / "checkpoints" / "step-6" / "state" / "__0_0.distcp"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    newest.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its checksum"):
        train(small_config(tmp_path / "run", f"train.resume={newest.parents[1]}"))
    result = train(small_config(tmp_path / "run", "train.max_steps=9"))  # auto: falls back to step 3
    assert result.step == 9
    assert_same_run(tmp_path / "whole", tmp_path / "run")


def test_a_checkpoint_that_does_not_match_its_config_is_refused_by_name(tmp_path: Path) -> None:
    """A checkpoint whose stored config was edited (manifest recomputed): reading or resuming names the tensor."""
    train(small_config(tmp_path / "run", "train.max_steps=3"))
    step = tmp_path / "run" / "checkpoints" / "step-3"
    config = step / "config.yaml"
    config.write_text(config.read_text().replace("ffn_dim: 64", "ffn_dim: 96"))
    checkpoints._write_manifest(step, 3)
    message = r"Size mismatch .* for model.layers.0.moe.experts.w1 \(on ranks 0\)"
    with pytest.raises(CheckpointError, match=message):
        open_model(step)
    with pytest.raises(CheckpointError, match=message):
        train(small_config(tmp_path / "again", f"train.resume={step}"))


def test_gradient_accumulation_matches_one_big_batch(tmp_path: Path) -> None:
    train(small_config(tmp_path / "one"))
    train(small_config(tmp_path / "two", "train.grad_accum=2"))
    one, two = torch.tensor(losses(tmp_path / "one")), torch.tensor(losses(tmp_path / "two"))
    torch.testing.assert_close(two[0], one[0])  # the same tokens, split in two micro-batches
    # later steps drift a little: the load-balancing loss is computed per micro-batch
    torch.testing.assert_close(two, one, rtol=0, atol=1e-2)


def test_non_finite_losses_are_skipped_then_stop_the_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = trainer_module.cross_entropy

    def sometimes_nan(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] in (2, 4, 5, 6, 7, 8) else loss

    monkeypatch.setattr(trainer_module, "cross_entropy", sometimes_nan)
    cfg = small_config(tmp_path, "train.max_nonfinite_steps=3", "train.eval_every=0", "train.max_steps=20")
    with pytest.raises(TrainingError, match="3 non-finite losses or gradients in a row"):
        train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r.get("skipped", False) for r in records] == [False, True, False, True, True, True]


def nan_gradient_on_call(monkeypatch: pytest.MonkeyPatch, calls: set[int]) -> None:
    """From now on, the gradients of the n-th step for n in `calls` (counted from 1) get a NaN; the loss is finite."""
    count = {"n": 0}
    real = trainer_module.sync_gradients

    def with_nan(model, job):
        count["n"] += 1
        real(model, job)
        if count["n"] in calls:
            next(model.parameters()).grad[0, 0] = float("nan")

    monkeypatch.setattr(trainer_module, "sync_gradients", with_nan)


def test_a_nan_gradient_of_a_finite_loss_skips_the_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gradient norm is checked too, so AdamW never writes NaN weights: the skipped step leaves the weights, the
    optimizer state (its step count included) and the expert bias as they were."""
    cfg = small_config(tmp_path, "train.log_every=100", "model.expert_bias_rate=0.01")
    with training_job(cfg, Console(quiet=True)) as trainer:
        trainer.train_step(details=False)
        state = copy.deepcopy(trainer.model.state_dict()), copy.deepcopy(trainer.optimizer.state_dict())
        nan_gradient_on_call(monkeypatch, {1})
        trainer.train_step(details=False)
        after = trainer.model.state_dict(), trainer.optimizer.state_dict()
        torch.testing.assert_close(after, state, rtol=0, atol=0)
        assert trainer.nonfinite.read() == (1, 1, 1)
        trainer.train_step(details=False)  # the next step is taken
        assert not torch.equal(trainer.model.state_dict()["norm.weight"], state[0]["norm.weight"])
        assert trainer.nonfinite.read() == (0, 1, 0)  # the longest run counts the one the last read saw


def test_steps_skipped_between_log_steps_are_counted_and_stop_the_run(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Skipped steps are reported at the next log step (skipped_steps), which stops the run where
    train.max_nonfinite_steps of them came in a row."""
    nan_gradient_on_call(monkeypatch, {2, 3, 6, 7, 8})
    cfg = small_config(tmp_path, "train.log_every=4", "train.eval_every=0", "train.save_every=0",
                       "train.max_steps=12", "train.max_nonfinite_steps=3")
    with pytest.raises(TrainingError, match="3 non-finite losses or gradients in a row"):
        train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r.get("skipped_steps")) for r in records] == [(4, 2), (8, 3)]
    assert records[0]["loss"] is not None and records[1]["loss"] is None and records[1]["grad_norm"] is None


@pytest.mark.parametrize("scope", ["block", "moe"])
def test_activation_checkpointing_takes_the_same_gradients(tmp_path: Path, scope: str) -> None:
    """Every parameter's first gradient with each block, or each MoE layer, recomputed in the backward pass equals
    the gradient without; the module tree shows what is checkpointed."""
    def first_gradients(name: str, *overrides: str) -> tuple[Trainer, dict[str, torch.Tensor]]:
        cfg = small_config(tmp_path / name, *overrides)
        trainer = Trainer(cfg, Console(quiet=True), runtime.start(cfg.parallel, torch.device("cpu")))
        trainer.compute_gradients(details=False)
        return trainer, {n: p.grad.clone() for n, p in trainer.model.named_parameters()}

    _, plain = first_gradients("plain")
    trainer, checkpointed = first_gradients(scope, f"train.activation_checkpointing={scope}")
    block = trainer.model.layers[0]
    assert type(block if scope == "block" else block.moe).__name__.startswith("Checkpointed")
    assert checkpointed.keys() == plain.keys()
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient, rtol=1e-6, atol=0, msg=name)


def test_compiled_blocks_still_log_lambda_and_compile_the_other_steps(tmp_path: Path) -> None:
    """With train.compile, a log step runs its blocks eagerly, so the probe's hooks see every layer's lambda; the
    steps that do not log (before and after) run compiled blocks."""
    train(small_config(tmp_path / "run", "train.compile=true", "train.activation_checkpointing=moe",
                       "train.max_steps=2", "train.log_every=2", "train.eval_every=0", "train.save_every=0"))
    (record,) = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(record["lambda"]) == 2 and all(math.isfinite(value) for value in record["lambda"])
    cfg = small_config(tmp_path / "steps", "train.compile=true")
    trainer = Trainer(cfg, Console(quiet=True), runtime.start(cfg.parallel, torch.device("cpu")))
    for details in (False, True, False):
        torch._dynamo.reset()  # each step compiles afresh, unless it runs eagerly
        torch._dynamo.utils.counters.clear()
        trainer.train_step(details=details)
        compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (compiled == 0) if details else (compiled > 0), (details, compiled)


def test_activation_checkpointing_of_earlier_configs_means_blocks(tmp_path: Path) -> None:
    assert small_config(tmp_path, "train.activation_checkpointing=true").train.activation_checkpointing == "block"
    assert small_config(tmp_path, "train.activation_checkpointing=false").train.activation_checkpointing == "none"
    assert TrainConfig(activation_checkpointing=True).activation_checkpointing == "block"  # from Python
    with pytest.raises(ConfigError, match="train.activation_checkpointing='attention' is not allowed: one of none, "
                                          "block, moe"):
        small_config(tmp_path, "train.activation_checkpointing=attention")


def test_bad_data_and_vocab_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="matches no file"):
        train(small_config(tmp_path, f"data.source={tmp_path / 'nothing'}"))
    with pytest.raises(Exception, match="model.vocab_size=100"):
        train(small_config(tmp_path, "model.vocab_size=100"))


def test_python_module_entry_point(tmp_path: Path) -> None:
    cfg = small_config(tmp_path, "train.max_steps=2")
    args = [f"{k}={v}" for k, v in [("train.out_dir", tmp_path), ("train.max_steps", 2)]]
    config_path = tmp_path / "c.yaml"
    from moe_diff.config import to_yaml

    config_path.write_text(to_yaml(cfg))
    process = subprocess.run([sys.executable, "-m", "moe_diff.train", str(config_path), *args],
                             capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def test_routing_traces_during_training_compare_across_steps(tmp_path: Path) -> None:
    from moe_diff.diagnostics import diagnose
    from moe_diff.routing.trace import load_trace

    train(small_config(tmp_path / "run", "train.trace_every=3", "train.eval_batches=1"))
    first, last = (tmp_path / "run" / "traces" / f"step-{s}.safetensors" for s in (3, 6))
    assert load_trace(first).header["step"] == 3 and load_trace(last).n_tokens == 4 * 32
    stats = diagnose(first, tmp_path / "diag", compare=last, console=Console(quiet=True))
    assert len(stats["comparison"]["layers"]) == 2
    assert torch.equal(load_trace(first).token_ids, load_trace(last).token_ids)
    diagnose(tmp_path / "run", tmp_path / "from_run", data=small_config(tmp_path).data, seq_len=32, max_tokens=128,
             console=Console(quiet=True))
    assert (tmp_path / "from_run" / "training_load.png").read_bytes()[:4] == b"\x89PNG"  # shares over steps


def test_a_step_that_does_not_log_reads_nothing_back(tmp_path: Path) -> None:
    """On a GPU every read drains the queue; a step that does not log makes none (a log step reads its record)."""
    cfg = small_config(tmp_path, "train.log_every=100", "model.capacity_factor=1.25")
    with training_job(cfg, Console(quiet=True)) as trainer:
        trainer.train_step(details=False)  # the first step builds what later steps reuse
        with counting_host_reads() as reads:
            trainer.train_step(details=False)
            assert reads == []
            trainer.train_step(details=True)
            assert "tolist" in reads and "item" in reads


def test_each_rank_reads_its_rows_and_positions_and_counts_rows_it_shares_in_part() -> None:
    """Rows that split over the 2 ranks reading different rows: each its own, counted whole; a short last batch's
    row that does not: read by both, each counting half. With cp=2, each rank's chunks (r and 3 - r of 4)."""
    from types import SimpleNamespace

    from moe_diff.data import Batch
    from moe_diff.parallel.context_parallel import SequenceLayout

    values = 10 * torch.arange(5)[:, None] + torch.arange(4)  # row r, position p: 10r + p
    batch = Batch(values, values, values, values)
    for data_rank, cp_rank in ((0, 0), (1, 1)):
        reader = SimpleNamespace(runtime=SimpleNamespace(row_readers=2, data_rank=data_rank, cp_rank=cp_rank),
                                 sequence_layout=SequenceLayout(2, 4, None), device=torch.device("cpu"))
        part, share = Trainer.rank_part(reader, batch, 0, 4)
        rows = [2 * data_rank, 2 * data_rank + 1]
        positions = [0, 3] if cp_rank == 0 else [1, 2]
        assert part.tokens.tolist() == [[10 * r + p for p in positions] for r in rows] and share == 1
        part, share = Trainer.rank_part(reader, batch, 4, 1)
        assert part.tokens.tolist() == [[40 + p for p in positions]] and share == 0.5
