"""What a stored model carries and how every command reads it: the tokenizer (stored, else its run's, else the one
given, else an error naming the flag), and kernels that the command that runs it chooses, not its checkpoint."""

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import JSON_PACKAGE, small_config  # tests/ is on the path

from moe_diff.checkpoint import open_model
from moe_diff.checkpoint import training as checkpoints
from moe_diff.cli import main
from moe_diff.config import DataConfig
from moe_diff.kernels import attention_op
from moe_diff.routing.trace import load_trace
from moe_diff.train import train


def said(capsys: pytest.CaptureFixture) -> str:
    captured = capsys.readouterr()
    return " ".join((captured.out + captured.err).split())


@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small run trained with a tokenizer.json: byte-level BPE of 300 ids learned on its own text, so that
    its ids are not the bytes'."""
    tokenizers = pytest.importorskip("tokenizers")
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False,
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train(sorted(str(path) for path in Path(JSON_PACKAGE).glob("*.py")), trainer)
    root = tmp_path_factory.mktemp("tokenizer-run")
    tokenizer.save(str(root / "tok.json"))
    train(small_config(root / "run", f"data.tokenizer={root / 'tok.json'}"))
    return root


def test_every_command_reads_text_with_the_tokenizer_the_model_was_trained_with(
        tokenizer_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = tmp_path / "moved"
    shutil.copytree(tokenizer_run, root)
    run, exported = root / "run", root / "exported"
    assert main(["export", str(run), str(exported)]) == 0
    assert (exported / "tokenizer.json").read_bytes() == (root / "tok.json").read_bytes()
    (root / "tok.json").unlink()  # the run's data.tokenizer is gone: the stored copies serve
    for source, stored in ((exported, exported), (run, run / "checkpoints" / "step-6")):
        trace = tmp_path / f"{source.name}.safetensors"
        assert main(["generate", str(source), "--prompt", "def", "--max-new-tokens", "2", "--trace", str(trace)]) == 0
        assert load_trace(trace).header["tokenizer"] == str(stored / "tokenizer.json")
        diagnosed = tmp_path / f"{source.name}-diag.safetensors"
        assert main(["diagnose", str(source), "--out", str(tmp_path / "diag"), "--tokens", "64", "--seq-len", "32",
                     "--trace", str(diagnosed)]) == 0
        assert load_trace(diagnosed).header["tokenizer"] == str(stored / "tokenizer.json")
    # a trace read back, compared with the checkpoint on the same text: read with the tokenizer the trace names
    on_text = ["--data", JSON_PACKAGE, "--tokens", "64", "--seq-len", "32"]
    assert main(["diagnose", str(run), *on_text, "--out", str(tmp_path / "d"), "--trace", str(tmp_path / "t")]) == 0
    assert main(["diagnose", str(tmp_path / "t"), *on_text, "--compare", str(run), "--out",
                 str(tmp_path / "compared")]) == 0
    comparison = json.loads((tmp_path / "compared" / "stats.json").read_text())["comparison"]
    assert all(layer["top1_changed"] == 0.0 for layer in comparison["layers"])
    capsys.readouterr()


def test_a_model_without_a_tokenizer_record_needs_the_flag(
        tokenizer_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import moe_diff

    bare = moe_diff.save(open_model(tokenizer_run / "run").model, tmp_path / "bare")  # from Python: no record
    argv = ["generate", str(bare), "--prompt", "def", "--max-new-tokens", "2"]
    assert main(argv) == 2
    assert (f"error: {bare} records no tokenizer: pass --tokenizer byte if the model was trained on bytes, or "
            "--tokenizer PATH/tokenizer.json") in said(capsys)
    assert main(["diagnose", str(bare), "--out", str(tmp_path / "diag"), "--tokens", "64"]) == 2
    assert "records no tokenizer" in said(capsys)
    assert main([*argv, "--tokenizer", "byte"]) == 0
    with_record = moe_diff.save(open_model(tokenizer_run / "run").model, tmp_path / "with-record",  # as a script would
                                DataConfig(tokenizer=str(tokenizer_run / "tok.json")))
    assert (with_record / "tokenizer.json").read_bytes() == (tokenizer_run / "tok.json").read_bytes()
    assert main(["generate", str(tmp_path / "nowhere"), "--prompt", "def"]) == 2
    assert f"error: {tmp_path / 'nowhere'} does not exist" in said(capsys)
    legacy = tmp_path / "legacy"  # a training checkpoint without its own tokenizer.json, the run's file gone
    shutil.copytree(tokenizer_run / "run" / "checkpoints" / "step-6", legacy)
    (legacy / "tokenizer.json").unlink()
    config = yaml.safe_load((legacy / "config.yaml").read_text())
    config["data"]["tokenizer"] = str(tmp_path / "gone.json")
    (legacy / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoints._write_manifest(legacy, 6)
    assert main(["generate", str(legacy), "--prompt", "def"]) == 2
    assert (f"was trained with data.tokenizer='{tmp_path / 'gone.json'}', which is not here: pass --tokenizer "
            "PATH/tokenizer.json") in said(capsys)


def stored_with_kernels(checkpoint: Path, attn_backend: str, moe_backend: str) -> None:
    """Edit a training checkpoint as if a job with these kernels (not installed here) had written it."""
    config = yaml.safe_load((checkpoint / "config.yaml").read_text())
    config["model"] |= {"attn_backend": attn_backend, "moe_backend": moe_backend}
    (checkpoint / "config.yaml").write_text(yaml.safe_dump(config))
    checkpoints._write_manifest(checkpoint, checkpoints.step_of(checkpoint))


def test_a_checkpoint_of_kernels_not_installed_here_opens_in_every_command(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(small_config(run))
    stored_with_kernels(run / "checkpoints" / "step-6", "flash_attn", "megablocks")  # CUDA-only, absent here
    base = ["--prompt", "def", "--max-new-tokens", "2"]
    assert main(["generate", str(run), *base]) == 0
    assert main(["generate", str(run), *base, "--attn-backend", "reference", "--moe-backend", "reference"]) == 0
    assert main(["diagnose", str(run), "--out", str(tmp_path / "diag"), "--tokens", "64", "--seq-len", "32",
                 "--attn-backend", "sdpa"]) == 0
    assert main(["eval", str(run), "--tasks", "stdlib_next_line", "--limit", "2"]) == 0
    assert main(["bench", str(run), "model.attn_backend=reference", "--out", str(tmp_path / "bench"), "--batch", "1",
                 "--prompt", "4", "--new-tokens", "2", "--repeats", "1", "--systems", "moe-diff"]) == 0
    assert main(["generate", str(run), *base, "--attn-backend", "flash_attn"]) == 2
    assert "model.attn_backend='flash_attn' is not available here" in said(capsys)
    assert main(["export", str(run), str(tmp_path / "single")]) == 0
    (tmp_path / "single" / "config.yaml").write_text(
        (tmp_path / "single" / "config.yaml").read_text().replace("attn_backend: auto", "attn_backend: flash_attn"))
    assert main(["generate", str(tmp_path / "single"), *base]) == 0
    result = train(small_config(run, "train.max_steps=7", "model.attn_backend=reference"))  # a resume here
    assert result.step == 7
    assert all(layer.attention.attend is attention_op("reference", "diff") for layer in result.model.layers)
    stored = yaml.safe_load((run / "checkpoints" / "step-7" / "config.yaml").read_text())["model"]
    assert stored["attn_backend"] == "reference"  # the record of what ran, which no reader is held to


def test_a_resume_names_the_model_fields_the_checkpoint_keeps(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    train(small_config(run))
    capsys.readouterr()
    from rich.console import Console

    from moe_diff.training.trainer import with_stored_model

    console = Console(force_terminal=False, width=400)
    with console.capture() as capture:
        cfg = with_stored_model(small_config(run, "model.ffn_dim=96", "model.attn_backend=sdpa"),
                                run / "checkpoints" / "step-6", console)
    assert re.search(r"the model is the checkpoint's, so it keeps model.ffn_dim=64 \(given 96\)$",
                     capture.get().strip())
    assert (cfg.model.ffn_dim, cfg.model.attn_backend) == (64, "sdpa")


def test_an_exported_transformers_directory_fixes_no_kernels(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    run = tmp_path / "run"
    train(small_config(run, "train.max_steps=3", "model.attn_backend=reference"))
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "hf"]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["attn_backend"], config["moe_backend"]) == ("auto", "auto")
    config["attn_backend"] = "flash_attn"  # as an earlier export of a GPU run recorded it
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert open_model(tmp_path / "hf").model.cfg.attn_backend == "auto"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "hf").model.cfg.attn_backend == "auto"
    chosen = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", attn_backend="reference").model
    assert all(layer.attention.attend is attention_op("reference", "diff") for layer in chosen.layers)


def test_checkpoints_store_the_tokenizer_as_the_job_read_it(tokenizer_run: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from moe_diff.training import trainer as trainer_module

    shutil.copy(tokenizer_run / "tok.json", tmp_path / "tok.json")
    original = (tmp_path / "tok.json").read_bytes()
    step = trainer_module.Trainer.train_step

    def step_then_remove_the_file(self, details):
        (tmp_path / "tok.json").unlink(missing_ok=True)  # moved or deleted while the job runs
        return step(self, details)

    monkeypatch.setattr(trainer_module.Trainer, "train_step", step_then_remove_the_file)
    result = train(small_config(tmp_path / "run", f"data.tokenizer={tmp_path / 'tok.json'}", "train.max_steps=2",
                                "train.save_every=1"))
    assert result.step == 2
    for step_dir in checkpoints.list_checkpoints(tmp_path / "run" / "checkpoints"):
        assert (step_dir / "tokenizer.json").read_bytes() == original
