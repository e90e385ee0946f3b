"""`moe-diff study`: its runs are `moe-diff train` runs (bitwise on the CPU), a stopped study resumes without
retraining what it finished, `--match params` matches, shared parameters start equal across modes, a planted
difference comes out of the paired report, and the report's images are PNGs the HTML names, with no empty
validation panel when the runs never evaluate."""

import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from rich.console import Console

from moe_diff.cli import main
from moe_diff.config import ConfigError, load_config
from moe_diff.costs import param_counts
from moe_diff.plotting import pyplot
from moe_diff.runs import METRICS_FILE, read_metrics
from moe_diff.study import runner
from moe_diff.study.aggregate import aggregate, scalars
from moe_diff.study.plan import plan_study
from moe_diff.study.report import plot_loss_curves, plot_needle, verdict
from moe_diff.training.job import training_job
from moe_diff.training.trainer import Trainer

CONFIG = str(Path(__file__).parents[2] / "configs" / "tiny.yaml")
SETTINGS = ["model.n_layers=2", "train.max_steps=4", "train.batch_size=4", "train.seq_len=64", "train.log_every=1",
            "train.eval_every=2", "train.eval_batches=1", "train.save_every=2", "train.sample_tokens=0"]
MEASURES = ["--tokens", "512", "--needle-trials", "1", "--needle-lengths", "80", "160"]


def study(out: Path, *flags: str) -> int:
    return main(["study", CONFIG, *SETTINGS, "--modes", "standard", "diff", "--seeds", "3", "--out", str(out),
                 *MEASURES, *flags])


def test_a_stopped_study_resumes_and_its_runs_are_train_runs(tmp_path: Path, monkeypatch) -> None:
    trained, train, save = [], runner.train, Trainer.save

    def killed_after_a_checkpoint(trainer: Trainer) -> Path:
        path = save(trainer)
        if trainer.cfg.model.attention == "diff" and trainer.step == 2:
            raise KeyboardInterrupt  # the study is stopped in its second run, after its step-2 checkpoint
        return path

    monkeypatch.setattr(runner, "train", lambda cfg, *args, **kwargs: trained.append(cfg.model.attention)
                        or train(cfg, *args, **kwargs))
    monkeypatch.setattr(Trainer, "save", killed_after_a_checkpoint)
    assert study(tmp_path / "study") == 1
    monkeypatch.setattr(Trainer, "save", save)
    finished = tmp_path / "study" / "runs" / "standard-seed3"
    kept = {path: path.stat().st_mtime_ns for path in finished.rglob("*") if path.is_file()}
    assert (finished / runner.RESULT_FILE) in kept and trained == ["standard", "diff"]
    assert [path.name for path in (tmp_path / "study" / "runs" / "diff-seed3" / "checkpoints").iterdir()] == \
        ["step-2"]  # where the unfinished run continues from

    assert study(tmp_path / "study") == 0
    assert trained == ["standard", "diff", "diff"]  # the finished run was not trained again
    assert {path: path.stat().st_mtime_ns for path in kept} == kept

    assert main(["train", CONFIG, *SETTINGS, "model.attention=diff", "train.seed=3",
                 f"train.out_dir={tmp_path / 'alone'}"]) == 0
    ours = read_metrics(tmp_path / "study" / "runs" / "diff-seed3" / METRICS_FILE)
    alone = read_metrics(tmp_path / "alone" / METRICS_FILE)
    assert [(r["step"], r["loss"], r.get("val_loss")) for r in ours] == \
        [(r["step"], r["loss"], r.get("val_loss")) for r in alone]  # bitwise, across the resume at step 2

    numbers = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [run["name"] for run in numbers["runs"]] == ["standard-seed3", "diff-seed3"]
    assert numbers["runs"][1]["curves"]["val_loss"] == [[r["step"], r["val_loss"]] for r in alone if "val_loss" in r]
    paired = numbers["aggregate"]["paired_with_baseline"]["diff"]["val_loss"]
    runs = {run["mode"]: run["scalars"]["val_loss"] for run in numbers["runs"]}
    assert paired["mean"] == runs["diff"] - runs["standard"] and paired["within_spread"]  # one seed: no spread
    page = (tmp_path / "study" / "report.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    assert sorted(images) == sorted(path.name for path in (tmp_path / "study").glob("*.png")) and len(images) == 5
    for image in images:
        assert (tmp_path / "study" / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "One seed has no spread" in page and "Table 5" in page

    stored = tmp_path / "study" / "runs" / "diff-seed3" / runner.RESULT_FILE  # probed at lengths no longer probed
    result = json.loads(stored.read_text())
    needle = result["measured"]["needle"]
    result["measured"]["needle"] = {"64": needle["80"], "160": needle["160"]}
    stored.write_text(json.dumps(result))
    checkpoints = {path: path.stat().st_mtime_ns for path in (stored.parent / "checkpoints").rglob("*")}
    assert study(tmp_path / "study") == 0
    assert list(json.loads(stored.read_text())["measured"]["needle"]) == ["80", "160"]  # measured again
    assert {path: path.stat().st_mtime_ns for path in (stored.parent / "checkpoints").rglob("*")} == checkpoints


def test_a_study_refuses_other_settings_in_its_directory(tmp_path: Path, capsys) -> None:
    out = tmp_path / "study"
    runner.check_plan(out, load_config(CONFIG, SETTINGS), "shapes")
    assert main(["study", CONFIG, *SETTINGS, "train.lr=0.001", "--modes", "diff", "--seeds", "0", "--out",
                 str(out)]) == 2
    assert "train.lr" in capsys.readouterr().err
    runner.check_plan(out, load_config(CONFIG, [*SETTINGS, "model.attn_backend=reference"]), "shapes")  # not a setting
    assert main(["study", CONFIG, *SETTINGS, "--modes", "diff", "diff", "--out", str(tmp_path / "other")]) == 2
    assert "at most once" in capsys.readouterr().err
    assert main(["study", CONFIG, *SETTINGS, f"data.source={tmp_path / 'no-such-texts'}", "--modes", "diff",
                 "standard", "--seeds", "0", "--parallel", "2", "--out", str(tmp_path / "failing")]) == 2
    error = capsys.readouterr().err  # the worker's last line, and where its log is
    assert re.search(r"run (diff|standard)-seed0 failed", error) and "no-such-texts" in error and "study.log" in error


def test_match_params_evens_out_total_parameters() -> None:
    cfg = load_config(CONFIG)
    runs, notes = plan_study(cfg, ["standard", "diff", "diff_v2"], [0], Path("out"), match="params")
    totals = {run.mode: param_counts(run.cfg.model).total for run in runs}
    assert all(abs(total / totals["standard"] - 1) <= 0.01 for total in totals.values())
    v2 = next(run.cfg.model for run in runs if run.mode == "diff_v2")
    assert abs(param_counts(cfg.model.__class__(**{**vars(cfg.model), "attention": "diff_v2"})).total
               / totals["standard"] - 1) > 0.01  # it was not within 1% before
    assert v2.ffn_dim < cfg.model.ffn_dim and v2.ffn_dim % 8 == 0
    assert len(notes) == 1 and f"ffn_dim {cfg.model.ffn_dim} -> {v2.ffn_dim}" in notes[0]
    shapes, _ = plan_study(cfg, ["standard", "diff_v2"], [0], Path("out"))
    assert all(run.cfg.model.ffn_dim == cfg.model.ffn_dim for run in shapes)  # the default keeps the shapes
    wide = load_config(CONFIG, ["model.dim=512", "model.ffn_dim=8", "model.n_experts=2", "model.top_k=1"])
    with pytest.raises(ConfigError, match="no model.ffn_dim"):
        plan_study(wide, ["standard", "diff_v2"], [0], Path("out"), match="params")


def test_shared_parameters_start_equal_across_modes_for_one_seed(tmp_path: Path) -> None:
    models = {}
    for mode, seed in (("standard", 5), ("diff", 5), ("diff_v2", 5), ("diff", 6)):
        cfg = load_config(CONFIG, [*SETTINGS, f"model.attention={mode}", f"train.seed={seed}",
                                   f"train.out_dir={tmp_path / f'{mode}-{seed}'}"])
        with training_job(cfg, Console(quiet=True)) as trainer:
            models[mode, seed] = dict(trainer.model.named_parameters())
    standard, diff, v2, other_seed = (models[key] for key in [("standard", 5), ("diff", 5), ("diff_v2", 5),
                                                               ("diff", 6)])
    for theirs in (diff, v2):
        shared = [name for name in standard if name in theirs and theirs[name].shape == standard[name].shape]
        assert "layers.0.moe.experts.w1" in shared and "layers.1.attention.wk.weight" in shared
        assert all(torch.equal(standard[name], theirs[name]) for name in shared)
    assert not torch.equal(diff["layers.0.moe.experts.w1"], other_seed["layers.0.moe.experts.w1"])
    assert "layers.0.attention.wq.weight" not in [name for name in standard if v2[name].shape == standard[name].shape]


def test_a_planted_difference_comes_out_of_the_paired_report() -> None:
    generator = torch.Generator().manual_seed(0)
    base = {seed: 3 + torch.rand(1, generator=generator).item() for seed in range(4)}
    runs = [{"mode": "standard", "seed": seed, "scalars": {"val_loss": loss}} for seed, loss in base.items()]
    runs += [{"mode": "diff", "seed": seed, "scalars": {"val_loss": loss - 0.25 + 0.01 * (-1) ** seed}}
             for seed, loss in base.items()]
    runs += [{"mode": "diff_v2", "seed": seed, "scalars": {"val_loss": loss + 0.02 * (-1) ** seed}}
             for seed, loss in base.items()]
    found = aggregate(runs, "standard")
    diff = found["paired_with_baseline"]["diff"]["val_loss"]
    assert diff["mean"] == pytest.approx(-0.25) and diff["std"] == pytest.approx(0.02 / 3 ** 0.5)  # +-0.01
    assert not diff["within_spread"] and "diff is lower (better)" in verdict("diff", "standard", "val_loss", diff)
    noise = found["paired_with_baseline"]["diff_v2"]["val_loss"]  # +-0.02 around no difference
    assert noise["within_spread"] and "Within the spread" in verdict("diff_v2", "standard", "val_loss", noise)
    assert found["per_mode"]["diff"]["val_loss"]["n"] == 4
    assert found["per_mode"]["standard"]["val_loss"]["mean"] == pytest.approx(sum(base.values()) / 4)


def test_loss_curves_without_validation_draw_only_the_training_panel(tmp_path: Path) -> None:
    widths = {}
    for evaluated in (True, False):  # train.eval_every=0 leaves every run's validation curve empty
        curves = {"loss": [[10, 4.0], [20, 3.5]], "val_loss": [[20, 3.6]] if evaluated else []}
        planned = {"modes": ["standard", "diff"], "runs": [{"mode": "standard", "curves": curves},
                                                          {"mode": "diff", "curves": curves}]}
        out = tmp_path / str(evaluated)
        out.mkdir()
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # matplotlib warns of a legend with nothing in it
            widths[evaluated] = pyplot().imread(plot_loss_curves(planned, out)).shape[1]
    assert widths[False] == widths[True] // 2  # one panel, not an empty validation panel beside it


def test_a_parallel_study_runs_its_runs_in_workers_as_train_would(tmp_path: Path) -> None:
    assert study(tmp_path / "study", "--parallel", "2") == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each of the two workers on a 2-core machine (OMP_NUM_THREADS=1)
    try:
        assert main(["train", CONFIG, *SETTINGS, "model.attention=diff", "train.seed=3",
                     f"train.out_dir={tmp_path / 'alone'}"]) == 0
    finally:
        torch.set_num_threads(threads)
    if runner.worker_environment(0, 2).get("OMP_NUM_THREADS") == "1":
        ours = read_metrics(tmp_path / "study" / "runs" / "diff-seed3" / METRICS_FILE)
        alone = read_metrics(tmp_path / "alone" / METRICS_FILE)
        assert [(r["step"], r["loss"]) for r in ours] == [(r["step"], r["loss"]) for r in alone]
    numbers = json.loads((tmp_path / "study" / "study.json").read_text())
    assert [run["name"] for run in numbers["runs"]] == ["standard-seed3", "diff-seed3"]
    assert "saved" in (tmp_path / "study" / "runs" / "diff-seed3" / runner.LOG_FILE).read_text()


@pytest.mark.parametrize(("overrides", "expected"), [
    ({"max_seq_len": 1024, "sliding_window": 128}, [128, 256, 1024]),  # half the window (64) holds no haystack
    ({"max_seq_len": 512, "sliding_window": None}, [128, 256, 512]),
    ({"max_seq_len": 256, "sliding_window": 512}, [256]),  # every length capped at max_seq_len
    ({"max_seq_len": 64, "sliding_window": None}, []),  # no haystack fits
])
def test_default_needle_lengths_are_those_a_haystack_fits(overrides: dict, expected: list[int]) -> None:
    from moe_diff.config import ModelConfig
    from moe_diff.data import ByteTokenizer
    from moe_diff.study.measure import needle_lengths

    cfg = ModelConfig(vocab_size=257, dim=16, n_layers=1, n_heads=2, n_kv_heads=2, ffn_dim=16, n_experts=2, top_k=1,
                      **overrides)
    assert needle_lengths(cfg, ByteTokenizer()) == expected


def test_a_study_whose_max_seq_len_holds_no_haystack_has_no_needle_numbers(tmp_path: Path) -> None:
    study = {"modes": ["standard", "diff"], "runs": [{"mode": "standard", "measured": {"needle": {}}},
                                                     {"mode": "diff", "measured": {"needle": {}}}]}
    assert plot_needle(study, tmp_path) is None
    assert "needle_accuracy" not in scalars({"val_loss": 2.0, "val_perplexity": 7.4, "needle": {},
                                             "attention": {"outliers": {}, "layers": [{"noise_mass": 0.1,
                                                                                       "entropy": 1.0}]},
                                             "routing": {"max_over_mean": [1.0], "dead_experts": [0],
                                                         "router_entropy": [0.5], "specialisation": {}},
                                             "costs": {}})
