"""The runs of a study: one job config per (attention mode, seed), equal but for `model.attention` (and, with
`--match params`, the `ffn_dim` that evens out the parameter counts), each an ordinary run directory."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from moe_diff.config import ATTENTION_MODES, Config, ConfigError, ModelConfig
from moe_diff.costs import param_counts
from moe_diff.errors import UsageError

RUNS_DIR = "runs"  # under the study directory: one run directory per (mode, seed)
MATCHES = ("shapes", "params")  # keep the config's shapes; or even out total parameters
BASELINE = "standard"  # the mode the others are compared with, when the study has it
FFN_STEP = 8  # --match params gives ffn_dim a multiple of this
PARAMS_TOLERANCE = 0.01  # --match params: total parameters within 1% of the smallest mode's


def run_name(mode: str, seed: int) -> str:
    """A run's directory name under OUT/runs."""
    return f"{mode}-seed{seed}"


@dataclass(frozen=True)
class PlannedRun:
    mode: str
    seed: int
    cfg: Config  # the whole job config of this run (train.out_dir is its run directory)

    @property
    def name(self) -> str:
        return run_name(self.mode, self.seed)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.train.out_dir)


def baseline_mode(modes: Sequence[str]) -> str:
    """The mode every other one is paired with: standard where the study has it, else its first mode."""
    return BASELINE if BASELINE in modes else modes[0]


def matched_models(base: ModelConfig, modes: Sequence[str], match: str) -> tuple[dict[str, ModelConfig], list[str]]:
    """Each mode's model config, and what was changed to match, in words. `params`: every mode larger than the
    smallest gets the ffn_dim (the config's, or a multiple of FFN_STEP below it) whose total parameters come
    closest to the smallest mode's, within PARAMS_TOLERANCE."""
    models = {mode: dataclasses.replace(base, attention=mode) for mode in modes}
    if match == "shapes":
        return models, []
    reference = min(modes, key=lambda mode: param_counts(models[mode]).total)
    target = param_counts(models[reference]).total
    notes = []
    for mode, cfg in models.items():
        if mode == reference:
            continue
        sizes = {cfg.ffn_dim, *range(FFN_STEP, cfg.ffn_dim, FFN_STEP)}
        totals = {size: param_counts(dataclasses.replace(cfg, ffn_dim=size)).total for size in sizes}
        best = min(totals, key=lambda size: (abs(totals[size] - target), abs(size - cfg.ffn_dim)))
        off = totals[best] / target - 1
        if abs(off) > PARAMS_TOLERANCE:
            raise ConfigError(f"--match params: no model.ffn_dim (a multiple of {FFN_STEP} below it) brings {mode} "
                              f"within {PARAMS_TOLERANCE:.0%} of {reference}'s {target:,} parameters (closest: ffn_dim="
                              f"{best}, {off:+.2%}); use --match shapes")
        if best != cfg.ffn_dim:
            before = param_counts(cfg).total / target - 1
            notes.append(f"--match params: {mode} model.ffn_dim {cfg.ffn_dim} -> {best}: {totals[best]:,} "
                         f"parameters, {off:+.2%} from {reference}'s {target:,} (before: {before:+.2%})")
            models[mode] = dataclasses.replace(cfg, ffn_dim=best)
    return models, notes


def plan_study(cfg: Config, modes: Sequence[str], seeds: Sequence[int], out: Path, match: str = "shapes"
               ) -> tuple[list[PlannedRun], list[str]]:
    """The runs, seed by seed (so that an interrupted study has whole seeds to compare first), and the notes of
    --match params. Refuses unknown or repeated modes and seeds, and a config a study cannot resume."""
    if not modes or len(set(modes)) != len(modes) or not set(modes) <= set(ATTENTION_MODES):
        raise UsageError(f"--modes {' '.join(modes)}: name each of {', '.join(ATTENTION_MODES)} at most once")
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds {' '.join(map(str, seeds))}: distinct integers >= 0, at least one")
    if match not in MATCHES:
        raise UsageError(f"--match {match}: one of {', '.join(MATCHES)}")
    if cfg.train.resume != "auto":
        raise ConfigError(f"train.resume={cfg.train.resume!r}: a study resumes its own runs, leave it at auto")
    models, notes = matched_models(cfg.model, modes, match)
    runs = []
    for seed in seeds:
        for mode in modes:
            train = dataclasses.replace(cfg.train, seed=seed, out_dir=str(out / RUNS_DIR / run_name(mode, seed)))
            runs.append(PlannedRun(mode, seed, dataclasses.replace(cfg, model=models[mode], train=train)))
    return runs, notes
