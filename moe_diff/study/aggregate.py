"""A study's numbers: each run's measurements as named scalars, their spread over seeds per mode, and each mode's
difference from the baseline paired by seed."""

from __future__ import annotations

from collections.abc import Sequence
from statistics import fmean, stdev
from typing import Any


def scalars(measured: dict[str, Any]) -> dict[str, float]:
    """One run's measurements as flat named numbers (means over layers where a value is per layer)."""
    found: dict[str, float] = {"val_loss": measured["val_loss"], "val_perplexity": measured["val_perplexity"]}
    needle = measured["needle"]
    accuracies = [depth["accuracy"] for probe in needle.values() for depth in probe["depths"]]
    if accuracies:  # none where max_seq_len holds no haystack
        found["needle_accuracy"] = fmean(accuracies)
    for length, probe in needle.items():
        found[f"needle_accuracy_{length}"] = fmean(depth["accuracy"] for depth in probe["depths"])
    for kind, stats in measured["attention"]["outliers"].items():
        for name, value in stats.items():
            found[f"{kind}_{name}"] = value
    layers = measured["attention"]["layers"]
    found["noise_mass"] = fmean(layer["noise_mass"] for layer in layers)
    found["attention_entropy"] = fmean(layer["entropy"] for layer in layers)
    if "lambda" in layers[0]:
        found["lambda"] = fmean(lam if isinstance(lam := layer["lambda"], float) else lam["mean"] for layer in layers)
    routing = measured["routing"]
    found["max_over_mean"] = fmean(routing["max_over_mean"])
    found["dead_experts"] = float(sum(routing["dead_experts"]))
    found["router_entropy"] = fmean(routing["router_entropy"])
    for group, values in routing["specialisation"].items():
        found[f"specialisation_{group}"] = fmean(values)
    found |= {name: float(value) for name, value in measured["costs"].items()}
    return found


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value), min, max and count."""
    return {"mean": fmean(values), "std": stdev(values) if len(values) > 1 else None, "min": min(values),
            "max": max(values), "n": len(values)}


def paired(differences: dict[int, float]) -> dict[str, Any]:
    """A mode's differences from the baseline, seed by seed: their spread, and whether the mean difference is
    within it: it is unless there are several seeds, every seed's difference has the same sign and the mean is
    larger than the standard deviation."""
    values = list(differences.values())
    found = spread(values) | {"by_seed": {str(seed): value for seed, value in differences.items()}}
    found["same_sign_in"] = max(sum(v > 0 for v in values), sum(v < 0 for v in values))
    found["within_spread"] = (found["std"] is None or found["same_sign_in"] < len(values)
                              or abs(found["mean"]) <= found["std"])
    return found


def aggregate(runs: Sequence[dict[str, Any]], baseline: str) -> dict[str, Any]:
    """`runs`: {"mode", "seed", "scalars"} each. Per mode and metric, the spread over seeds; per mode other than
    the baseline and metric, the differences from the baseline's run of the same seed."""
    modes = list(dict.fromkeys(run["mode"] for run in runs))
    by_mode = {mode: {run["seed"]: run["scalars"] for run in runs if run["mode"] == mode} for mode in modes}
    per_mode = {}
    for mode, seeds in by_mode.items():
        metrics = list(dict.fromkeys(name for values in seeds.values() for name in values))
        per_mode[mode] = {name: spread([values[name] for values in seeds.values() if name in values])
                          for name in metrics}
    differences = {}
    for mode, seeds in by_mode.items():
        if mode == baseline:
            continue
        ours, theirs = seeds, by_mode[baseline]
        shared = [seed for seed in ours if seed in theirs]
        metrics = [name for name in per_mode[mode] if name in per_mode[baseline]]
        differences[mode] = {name: paired({seed: ours[seed][name] - theirs[seed][name] for seed in shared})
                             for name in metrics if shared and all(
                                 name in ours[seed] and name in theirs[seed] for seed in shared)}
    return {"baseline": baseline, "per_mode": per_mode, "paired_with_baseline": differences}
