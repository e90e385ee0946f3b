"""The command line: info and convert, including their errors."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch

from moe_diff import checkpoint
from moe_diff.checkpoint import CheckpointError
from moe_diff.checkpoint import training as checkpoints
from moe_diff.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def test_info_compares_the_three_modes(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(CONFIGS / "mixtral-8x7b-diff.yaml"), "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "46,702,817,280" in out and "12,879,949,824" in out
    for mode in ("diff *", "diff_v2", "standard", "KV cache per token (bfloat16)", "128 KiB"):
        assert mode in out


def test_info_reports_each_ranks_attention_under_context_parallelism(capsys: pytest.CaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Mixtral-8x7B diff at 64K tokens over 8 ranks: each rank holds 8,192 positions and receives the window's
    4,095 earlier ones (8 kv heads x 128 x 2 x bfloat16: 16 MiB); without a window, the rank holding the last
    chunk attends to every key. A length that only the window's blocks split leaves the no-window column n/a."""
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["info", str(CONFIGS / "mixtral-8x7b-diff.yaml"), "parallel.cp=8", "train.seq_len=65536",
                 "model.max_seq_len=65536"]) == 0
    rows = {line.split("│")[1].strip(): [cell.strip() for cell in line.split("│")[2:-1]]
            for line in capsys.readouterr().out.splitlines() if line.count("│") == 6}
    assert rows["positions held (queries)"] == ["65,536", "8,192", "65,536", "8,192"]
    assert rows["positions attended (keys, own included)"] == ["65,536", "12,287", "65,536", "65,536"]
    assert rows["keys + values a rank receives per layer, at most (gradients sent back alike)"][:2] == ["0 B",
                                                                                                      "16 MiB"]
    assert main(["info", str(CONFIGS / "tiny.yaml"), "parallel.cp=4", "train.seq_len=1028",
                 "model.max_seq_len=1028"]) == 0
    assert "n/a: train.seq_len=1028 must split into 2 x parallel.cp chunks" in " ".join(capsys.readouterr().out.split())


def test_info_with_overrides_and_forward_check(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(CONFIGS / "tiny.yaml"), "model.n_layers=1", "model.attention=diff_v2",
                 "--forward", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "attention=diff_v2, 1 layers" in out and "forward+backward of 2 x 16" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["info", "missing.yaml"], "does not exist"),
    (["info", str(CONFIGS / "tiny.yaml"), "model.top_k=0"], "model.top_k=0"),
    (["info", str(CONFIGS / "tiny.yaml"), "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["convert", ".", "elsewhere"], "neither a Mixtral or exported transformers directory"),
])
def test_errors_are_reported_with_exit_code_2(argv: list[str], needle: str,
                                              capsys: pytest.CaptureFixture) -> None:
    assert main(argv) == 2
    assert needle in " ".join(capsys.readouterr().err.split())


def test_convert_both_ways_and_refuse_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from moe_diff.config import ModelConfig
    from moe_diff.model import MoEDiffTransformer

    model = MoEDiffTransformer(ModelConfig(vocab_size=30, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                           ffn_dim=8, n_experts=2, top_k=1, attention="standard"))
    checkpoint.save(model, tmp_path / "ours")
    assert main(["convert", str(tmp_path / "ours"), str(tmp_path / "hf")]) == 0
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--dtype", "bfloat16"]) == 0
    back = checkpoint.load(tmp_path / "back")
    assert back.norm.weight.dtype == torch.bfloat16
    expected = model.layers[0].moe.experts.w2.bfloat16()
    assert torch.equal(back.layers[0].moe.experts.w2, expected)
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours")]) == 2
    assert "refusing to overwrite" in capsys.readouterr().err


def test_train_tokenize_and_plot_commands(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(8):
        (texts / f"{i}.txt").write_text(f"text number {i} " * 40)
    assert main(["tokenize", str(texts), "--out", str(tmp_path / "tokens.bin")]) == 0
    assert "8 documents" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["train", str(CONFIGS / "tiny.yaml"), "model.n_layers=1", "model.attention=standard",
                 "train.max_steps=3", "train.seq_len=32",
                 "train.batch_size=2", "train.sample_tokens=8", "train.eval_batches=1", f"train.out_dir={run}",
                 f"data.source={tmp_path / 'tokens.bin'}", "data.val_fraction=0.3"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "sample after step 3" in out and "Routing of 64 validation tokens" in out
    assert main(["plot-metrics", str(run)]) == 0 and (run / "metrics.png").is_file()
    assert main(["diagnose", str(run), "--out", str(tmp_path / "diag"), "--tokens", "64", "--seq-len", "32"]) == 0
    assert "Routing by layer" in capsys.readouterr().out and (tmp_path / "diag" / "report.html").is_file()
    trace_file = tmp_path / "generated.safetensors"
    assert main(["generate", str(run), "--prompt", "text", "--max-new-tokens", "5", "--trace", str(trace_file)]) == 0
    from moe_diff.routing.trace import load_trace

    trace = load_trace(trace_file)
    assert trace.n_tokens == 4 + 5 and trace.header["source"].startswith("generate")
    assert trace.token_ids[:4].tolist() == list(b"text")
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "mixtral"]) == 0
    import transformers

    tokens = torch.tensor([list(b"text number 3")])
    ours = checkpoint.open_model(run / "checkpoints" / "step-3").model
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2  # never over a non-empty directory
    assert main(["train", str(CONFIGS / "tiny.yaml"), "data.source=/nonexistent/*.txt"]) == 2
    assert "matches no file" in capsys.readouterr().err


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished small run with checkpoints at steps 3 and 6."""
    from helpers import small_config  # tests/ is on the path

    from moe_diff.train import train

    out = tmp_path_factory.mktemp("run")
    train(small_config(out))
    return out


def copied_run(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def test_a_damaged_newest_checkpoint_is_named_by_every_command_that_skips_it(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = copied_run(run_dir, tmp_path)
    shard = run / "checkpoints" / "step-6" / "state" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    commands = [["generate", str(run), "--prompt", "def", "--max-new-tokens", "2"],
                ["diagnose", str(run), "--out", str(tmp_path / "diag"), "--tokens", "64", "--seq-len", "32"],
                ["bench", str(run), "--out", str(tmp_path / "bench"), "--batch", "1", "--prompt", "4",
                 "--new-tokens", "2", "--repeats", "1", "--systems", "moe-diff"],
                ["export", str(run), str(tmp_path / "exported")]]
    for argv in commands:
        assert main(argv) == 0, argv
        said = " ".join((lambda out: out.out + out.err)(capsys.readouterr()).split())
        assert "skipping checkpoint:" in said and "step-6 is damaged: state/__0_0.distcp does not match" in said
        assert f"opened {run / 'checkpoints' / 'step-3'}" in said, argv


def test_a_stored_data_section_is_validated_like_a_config_file(run_dir: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    run = copied_run(run_dir, tmp_path)
    step = run / "checkpoints" / "step-6"
    for edit, needle in (("  text_field: text\n", "unknown config key 'data.shuffle'"),
                         ("  val_fraction: 0.3\n", "data.val_fraction=2.0 is not allowed")):
        config = step / "config.yaml"
        original = config.read_text()
        assert edit in original
        config.write_text(original.replace(edit, "  shuffle: true\n" + edit if "text_field" in edit
                                           else "  val_fraction: 2.0\n"))
        checkpoints._write_manifest(step, 6)
        with pytest.raises(CheckpointError, match=re.escape(needle)):
            checkpoint.open_model(run)
        assert main(["generate", str(run), "--prompt", "def", "--max-new-tokens", "2"]) == 2
        assert needle in " ".join(capsys.readouterr().err.split())
        config.write_text(original)


def test_a_tokenizer_with_more_ids_than_the_model_is_refused_before_any_work(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture) -> None:
    """Byte-level text needs 257 ids; a 256-id model would fail only once an end-of-text token was routed."""
    from moe_diff.config import DataConfig, ModelConfig
    from moe_diff.model import MoEDiffTransformer

    model = MoEDiffTransformer(ModelConfig(vocab_size=256, dim=16, n_layers=1, n_heads=2, n_kv_heads=2,
                                           ffn_dim=16, n_experts=2, top_k=1, max_seq_len=64))
    checkpoint.save(model, tmp_path / "ckpt", DataConfig(tokenizer="byte"))  # recorded: trained on bytes
    needle = "model.vocab_size=256 is too small for data.tokenizer='byte' (257 ids)"
    for argv in (["diagnose", str(tmp_path / "ckpt"), "--out", str(tmp_path / "diag"), "--tokens", "1024"],
                 ["generate", str(tmp_path / "ckpt"), "--prompt", "x", "--max-new-tokens", "1"]):
        assert main(argv) == 2
        assert needle in " ".join(capsys.readouterr().err.split())
    assert not (tmp_path / "diag" / "stats.json").exists()


def test_info_counts_a_config_whose_backend_is_not_installed_here(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(CONFIGS / "tiny.yaml"), "model.attn_backend=flash_attn"]) == 0
    assert "active per token" in capsys.readouterr().out


def test_damaged_inputs_are_one_line_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A config.json that is not JSON, and a metrics file with a broken line (not the last one, which a kill may
    leave cut short and is skipped)."""
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{not json")
    (tmp_path / "hf" / "model.safetensors").write_bytes(b"")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "config.json is not valid JSON" in " ".join(capsys.readouterr().err.split())
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo')
    assert main(["plot-metrics", str(run)]) == 0  # the cut-short last line is left out
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "lo\n{"step": 3, "loss": 2.0}\n')
    assert main(["plot-metrics", str(run)]) == 2
    assert "metrics.jsonl:2 is not a metrics record" in " ".join(capsys.readouterr().err.split())


def test_brackets_in_messages_and_paths_are_printed_as_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture) -> None:
    """Install hints name extras in brackets, and a path may hold what looks like a closing markup tag."""
    monkeypatch.setattr("moe_diff.kernels.HAVE_TRITON", False)
    assert main(["info", str(CONFIGS / "tiny.yaml"), "model.attn_backend=triton", "--forward", "--seq-len", "8"]) == 2
    assert "pip install 'moe-diff[gpu]'" in capsys.readouterr().err
    odd = tmp_path / "[/x]" / "[bold]tiny.yaml"
    assert main(["info", str(odd)]) == 2
    assert capsys.readouterr().err == f"error: config file {str(odd)!r} does not exist\n"


def byte_echo_checkpoint(path: Path, max_seq_len: int = 64, window: int | None = None) -> Path:
    """A byte-level checkpoint whose greedy continuation is byte 0xFF over and over (not UTF-8): every layer adds
    nothing, every token embeds alike, and only the head row of 0xFF sees the embedding."""
    from moe_diff.config import ModelConfig
    from moe_diff.model import MoEDiffTransformer

    model = MoEDiffTransformer(ModelConfig(vocab_size=257, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16,
                                           n_experts=2, top_k=1, max_seq_len=max_seq_len, sliding_window=window,
                                           attention="standard"))
    with torch.no_grad():
        model.layers[0].attention.wo.weight.zero_()
        model.layers[0].moe.experts.w2.zero_()
        model.tok_embeddings.weight.fill_(1.0)
        model.output.weight.zero_()
        model.output.weight[0xFF] = 1.0
    checkpoint.save(model, path)
    return path


def test_a_prompt_that_is_not_utf8_is_generated_from_its_bytes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """argv holds undecodable bytes as surrogates: the byte tokenizer reads the bytes themselves, a tokenizer.json
    refuses, and a continuation that is not UTF-8 prints as replacement characters."""
    tokenizers = pytest.importorskip("tokenizers")
    ckpt = byte_echo_checkpoint(tmp_path / "ckpt")
    prompt = os.fsdecode(b"abc\xff\xfe")  # as sys.argv holds it
    trace_file = tmp_path / "trace.safetensors"
    assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", "3", "--temperature", "0",
                 "--tokenizer", "byte", "--trace", str(trace_file)]) == 0
    assert capsys.readouterr().out.startswith("abc" + "\ufffd" * 5 + "\n")
    from moe_diff.routing.trace import load_trace

    assert load_trace(trace_file).token_ids.tolist() == list(b"abc\xff\xfe\xff\xff\xff")
    vocab = {"<unk>": 0, "<|endoftext|>": 1, "abc": 2}
    tokenizer = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert main(["generate", str(ckpt), "--prompt", prompt, "--tokenizer", str(tmp_path / "tokenizer.json")]) == 2
    said = capsys.readouterr()
    assert said.out == "" and said.err.splitlines()[-1].startswith("error: --prompt is not valid UTF-8")


def test_the_environment_record_says_unknown_for_a_commit_git_cannot_give(tmp_path: Path, monkeypatch,
                                                                         capsys: pytest.CaptureFixture) -> None:
    """No git on PATH, then a git that fails (not a repository): bench still times and writes its record."""
    ckpt = byte_echo_checkpoint(tmp_path / "ckpt")
    bench = ["bench", str(ckpt), "--batch", "1", "--prompt", "4", "--new-tokens", "2", "--repeats", "1",
             "--systems", "moe-diff"]
    monkeypatch.setenv("PATH", str(tmp_path / "nothing-here"))
    assert main([*bench, "--out", str(tmp_path / "no-git")]) == 0
    assert json.loads((tmp_path / "no-git.json").read_text())["environment"]["commit"] == "unknown"
    failing = tmp_path / "bin" / "git"
    failing.parent.mkdir()
    failing.write_text(f"#!{sys.executable}\nimport sys\nsys.exit('fatal: not a git repository')\n")
    failing.chmod(0o755)
    monkeypatch.setenv("PATH", str(failing.parent))
    assert main([*bench, "--out", str(tmp_path / "failing-git")]) == 0
    assert json.loads((tmp_path / "failing-git.json").read_text())["environment"]["commit"] == "unknown"
    capsys.readouterr()


def test_prompt_and_new_tokens_are_checked_against_max_seq_len_before_any_output(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Without a window the model has max_seq_len positions: a long prompt (past one prefill chunk) and a long
    continuation are refused with their numbers and the way out; with a window a rolling cache goes on past it."""
    ckpt = byte_echo_checkpoint(tmp_path / "ckpt", max_seq_len=128)
    for prompt, new, needle in (
            ("x" * 600, 5, "the prompt (600 tokens) and --max-new-tokens 5 make 605 positions, more than the model's "
                           "max_seq_len (128) without a sliding window: shorten the prompt to at most 123 tokens"),
            ("abc", 300, "the prompt (3 tokens) and --max-new-tokens 300 make 303 positions, more than the model's "
                         "max_seq_len (128) without a sliding window: use --max-new-tokens 125 or fewer")):
        assert main(["generate", str(ckpt), "--prompt", prompt, "--max-new-tokens", str(new),
                     "--tokenizer", "byte"]) == 2
        said = capsys.readouterr()
        assert said.out == "" and said.err.splitlines()[-1] == f"error: {needle}"
    windowed = byte_echo_checkpoint(tmp_path / "windowed", max_seq_len=128, window=16)
    assert main(["generate", str(windowed), "--prompt", "x" * 600, "--max-new-tokens", "30", "--temperature", "0",
                 "--tokenizer", "byte"]) == 0
    assert capsys.readouterr().out == "x" * 600 + "\ufffd" * 30 + "\n"


def test_every_flag_has_help_and_shows_its_default(capsys: pytest.CaptureFixture) -> None:
    from moe_diff.cli import build_parser

    with pytest.raises(SystemExit):
        main(["--help"])
    top = capsys.readouterr().out
    assert "The `moe-diff` command line" not in top and "moe-diff train" in top
    commands = next(a for a in build_parser()._actions if a.choices and "generate" in a.choices).choices
    for name, parser in commands.items():
        for action in parser._actions:
            assert action.help, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    generate_help = " ".join(capsys.readouterr().out.split())
    for shown in ("--max-new-tokens MAX_NEW_TOKENS how many tokens to generate (default: 200)",
                  "(default: 0.8)", "--seed SEED", "(default: 1.0)"):
        assert shown in generate_help


def test_an_unknown_flag_is_reported_with_its_subcommands_usage(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["generate", "run", "--prompt", "hi", "--bogus"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith("usage: moe-diff generate ")
    assert "moe-diff generate: error: unrecognized arguments: --bogus" in err


def test_a_sampling_error_is_printed_before_the_prompt_is_echoed(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    ckpt = byte_echo_checkpoint(tmp_path / "ckpt")
    assert main(["generate", str(ckpt), "--prompt", "hi", "--top-p", "2", "--max-new-tokens", "2",
                 "--tokenizer", "byte"]) == 2
    said = capsys.readouterr()
    assert "hi" not in said.out and said.err.splitlines()[-1].startswith("error: need temperature >= 0")


@pytest.mark.parametrize(("overrides", "needle"), [
    (["train.out_dir="], "train.out_dir=null is not allowed: a string, e.g. train.out_dir=runs/default"),
    (["modle.dim=64"], "unknown config key 'modle.dim' (did you mean 'model.dim'?); keys of model: vocab_size, dim,"),
    (["parallel.tp=2"], "parallel.tp=2 must divide the world size 1 (torchrun --nproc_per_node x nodes): run a "
                        "multiple of 2 processes under torchrun, or set parallel.tp=1"),
])
def test_config_mistakes_name_the_fix(tmp_path: Path, overrides: list[str], needle: str,
                                      capsys: pytest.CaptureFixture) -> None:
    assert main(["train", str(CONFIGS / "tiny.yaml"), f"train.out_dir={tmp_path / 'run'}", *overrides]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert err.startswith(f"error: {needle}") and "train.seed" not in err
