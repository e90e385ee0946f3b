"""The command line: info and convert, including their errors."""

from pathlib import Path

import pytest
import torch

from moe_diff import checkpoint, train_checkpoint
from moe_diff.cli import main

CONFIGS = Path(__file__).parents[1] / "configs"


def test_info_compares_the_three_modes(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(CONFIGS / "mixtral-8x7b-diff.yaml"), "--seq-len", "4096"]) == 0
    out = capsys.readouterr().out
    assert "46,702,817,280" in out and "12,879,949,824" in out
    for mode in ("diff *", "diff_v2", "standard", "KV cache per token (bfloat16)", "128 KiB"):
        assert mode in out


def test_info_with_overrides_and_forward_check(capsys: pytest.CaptureFixture) -> None:
    assert main(["info", str(CONFIGS / "tiny.yaml"), "model.n_layers=1", "model.attention=diff_v2",
                 "--forward", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "attention=diff_v2, 1 layers" in out and "forward+backward of 2 x 16" in out


@pytest.mark.parametrize(("argv", "needle"), [
    (["info", "missing.yaml"], "does not exist"),
    (["info", str(CONFIGS / "tiny.yaml"), "model.top_k=0"], "model.top_k=0"),
    (["info", str(CONFIGS / "tiny.yaml"), "--seq-len", "0"], "--seq-len must be a positive integer"),
    (["convert", ".", "elsewhere"], "neither a Mixtral directory"),
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
    from moe_diff.diagnostics import load_trace

    trace = load_trace(trace_file)
    assert trace.n_tokens == 4 + 5 and trace.header["source"].startswith("generate")
    assert trace.token_ids[:4].tolist() == list(b"text")
    assert main(["export", str(run), str(tmp_path / "hf"), "--format", "mixtral"]) == 0
    import transformers

    tokens = torch.tensor([list(b"text number 3")])
    ours = train_checkpoint.open_model(run / "checkpoints" / "step-3").model
    theirs = transformers.MixtralForCausalLM.from_pretrained(tmp_path / "hf")
    torch.testing.assert_close(theirs(tokens).logits, ours(tokens).logits, rtol=1e-4, atol=1e-4)
    assert main(["export", str(run), str(tmp_path / "hf")]) == 2  # never over a non-empty directory
    assert main(["train", str(CONFIGS / "tiny.yaml"), "data.source=/nonexistent/*.txt"]) == 2
    assert "matches no file" in capsys.readouterr().err
