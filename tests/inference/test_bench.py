"""The inference benchmark: its byte count, forced routing, and a whole run of every system at a tiny size."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import CONFIGS  # tests/ is on the path

from moe_diff.cli import main
from moe_diff.config import ModelConfig
from moe_diff.inference.bench import BenchSettings, run_bench
from moe_diff.inference.bench.measure import decode_step_bytes, percentile
from moe_diff.inference.bench.report import markdown
from moe_diff.inference.bench.routing import ForcedScores, expert_log_probs
from moe_diff.model import MoEDiffTransformer


def small_model(attention: str = "standard") -> MoEDiffTransformer:
    torch.manual_seed(0)
    return MoEDiffTransformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                          sliding_window=8, max_seq_len=64, attention=attention))


@pytest.mark.parametrize("attention", ["standard", "diff", "diff_v2"])
def test_a_step_reading_every_expert_reads_the_whole_model_but_the_embedding_table(attention: str) -> None:
    model = small_model(attention)
    cfg = model.cfg
    params = sum(p.numel() for p in model.parameters())
    every_expert = cfg.n_layers * cfg.n_experts
    assert decode_step_bytes(cfg, 1, 0, every_expert, 1) == params - cfg.vocab_size * cfg.dim + cfg.dim
    kv_per_key = cfg.n_layers * 2 * cfg.n_kv_heads * cfg.resolved_head_dim * 4  # float32 keys and values
    one_expert = 3 * cfg.dim * cfg.ffn_dim * 4
    assert (decode_step_bytes(cfg, 3, 5, 2, 4) - decode_step_bytes(cfg, 3, 4, 1, 4)
            == 3 * kv_per_key + one_expert)
    tied = dataclasses.replace(cfg, tie_embeddings=True)  # the one table is read whole, as the output head
    assert decode_step_bytes(tied, 1, 0, every_expert, 1) == params - cfg.vocab_size * cfg.dim + cfg.dim


def test_forced_routing_draws_experts_in_proportion_and_is_a_function_of_the_input() -> None:
    x = torch.randn(20000, 32, generator=torch.Generator().manual_seed(0))
    for mode in ("uniform", "zipf"):
        scores = ForcedScores(mode, 32, 8, seed=3)
        first = torch.bincount(scores(x).argmax(-1), minlength=8).double() / len(x)
        torch.testing.assert_close(first, expert_log_probs(mode, 8).exp(), atol=0.015, rtol=0)
        assert torch.equal(scores(x[:5]), scores(x)[:5])
    with pytest.raises(ValueError, match="routing must be one of own, uniform, zipf"):
        expert_log_probs("skewed", 8)


def test_percentiles_interpolate() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0 and percentile([0.0, 10.0], 90) == 9.0


def test_every_system_runs_and_forced_routing_reaches_transformers_too() -> None:
    model = small_model()
    settings = BenchSettings(batch_sizes=[1, 3], prompt_lengths=[4, 12], new_tokens=5, routing="zipf")
    labels = []
    results = run_bench(model, settings, labels.append)
    assert len(results["runs"]) == 3 * 2 * 2 and len(labels) == 3 * 2 * 2 * (1 + settings.repeats)
    runs = {(r["system"], r["batch"], r["prompt_length"]): r for r in results["runs"]}
    for (system, batch, prompt_length), row in runs.items():
        assert row["gaps_timed"] == 3 * 4 and 0 < row["itl_p50_s"] <= row["itl_p90_s"] <= row["itl_p99_s"]
        assert row["decode_tokens_per_s"] == pytest.approx(batch / row["itl_mean_s"])
        assert row["bandwidth_share"] > 0 and row["bytes_per_step"] > 0
        layers = model.cfg.n_layers
        if system == "dense":
            assert row["experts_read_per_step"] == layers
        else:  # the same weights and the same forced choices in both implementations
            assert 2 * layers <= row["experts_read_per_step"] <= min(2 * batch, 8) * layers
            assert row["experts_read_per_step"] == pytest.approx(
                runs[("transformers", batch, prompt_length)]["experts_read_per_step"], abs=0.5)
    assert {(s["system"], s["versus"], s["batch"], s["prompt_length"]) for s in results["speedups"]} == {
        ("moe-diff", versus, b, p) for versus in ("transformers", "dense") for b in (1, 3) for p in (4, 12)}
    assert all(block.moe.gate._forward_hooks == {} for block in model.layers)  # the model's own router is back


def test_compile_times_moe_diff_eager_and_compiled_side_by_side() -> None:
    """With compile, moe-diff runs twice, eager and with compiled decode steps, under one forced routing, and each
    has its speed-ups over the other systems."""
    model = small_model()
    settings = BenchSettings(batch_sizes=[3], prompt_lengths=[4], new_tokens=4, routing="zipf", compile=True,
                             repeats=1, systems=["moe-diff", "dense"])
    results = run_bench(model, settings)
    runs = {r["system"]: r for r in results["runs"]}
    assert list(runs) == ["moe-diff", "moe-diff compiled", "dense"]
    assert all(2 * 2 <= runs[name]["experts_read_per_step"] <= 6 * 2 for name in ("moe-diff", "moe-diff compiled"))
    assert {(s["system"], s["versus"]) for s in results["speedups"]} == {("moe-diff", "dense"),
                                                                          ("moe-diff compiled", "dense")}
    assert "| moe-diff compiled | dense | 4 | 3 |" in markdown(results)
    assert all(block.moe.gate._forward_hooks == {} for block in model.layers)


def test_bench_command_writes_json_markdown_and_png(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "results" / "tiny"
    argv = ["bench", str(CONFIGS / "tiny.yaml"), "model.n_layers=1", "model.dim=64", "--batch", "2",
            "--prompt", "3", "--new-tokens", "3", "--routing", "uniform", "--repeats", "1", "--out", str(out)]
    assert main(argv) == 0
    results = json.loads(out.with_suffix(".json").read_text())
    assert [r["system"] for r in results["runs"]] == ["moe-diff", "dense"]  # diff attention: no Mixtral twin
    assert results["routing"] == "uniform" and results["environment"]["versions"]["torch"] == torch.__version__
    assert out.with_suffix(".png").stat().st_size > 0
    assert "| moe-diff | 3 | 2 |" in out.with_suffix(".md").read_text() and "dense" in capsys.readouterr().out


@pytest.mark.parametrize(("extra", "needle"), [
    (["--systems", "transformers"], "transformers comparison runs Mixtral"),
    (["--batch", "0"], "batch sizes must be positive"),
    (["--prompt", "600"], "exceeds the model's max_seq_len 512"),
    (["--new-tokens", "1"], "new_tokens must be >= 2"),
    (["--repeats", "0"], "repeats must be >= 1"),
])
def test_bench_refuses_bad_settings(extra: list[str], needle: str, tmp_path: Path,
                                    capsys: pytest.CaptureFixture) -> None:
    assert main(["bench", str(CONFIGS / "tiny.yaml"), "--out", str(tmp_path / "x"), "--prompt", "8", *extra]) == 2
    assert needle in " ".join(capsys.readouterr().err.split())
    assert not list(tmp_path.iterdir())
