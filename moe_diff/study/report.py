"""The study's report: report.html beside PNGs of the loss curves, the needle probe, the activation outliers (with
the DIFF Transformer paper's), lambda over training and routing per mode; each plot says how to read it, and each
difference from the baseline says whether it is within the spread over seeds."""

from __future__ import annotations

import html
from pathlib import Path
from statistics import fmean
from typing import Any

import numpy as np

from moe_diff.diagnostics.attention import OUTLIER_NAMES
from moe_diff.diagnostics.report import html_page
from moe_diff.files import write_text
from moe_diff.plotting import heatmap, integer_ticks, pyplot, save

# Table 5 of the DIFF Transformer paper (3B models trained on 350B tokens; statistics over 0.4M tokens)
PAPER_OUTLIERS = {
    "attention_logits": {"Transformer": [318.0, 308.2, 304.9, 284.7, 251.5, 5.4],
                         "DIFF Transformer": [38.8, 38.8, 37.3, 32.0, 27.4, 3.3]},
    "hidden_states": {"Transformer": [3608.6, 3607.4, 3603.6, 3552.1, 2448.2, 0.6],
                      "DIFF Transformer": [1688.2, 1672.5, 1672.1, 1624.3, 740.9, 1.2]},
}
# metric -> (what it is, True where lower is better, None where neither is): the rows of the final table
METRICS = {
    "val_loss": ("validation loss (nats per token)", True),
    "val_perplexity": ("validation perplexity", True),
    "needle_accuracy": ("needle accuracy, all lengths and depths", False),
    "attention_logits_top1": ("largest |attention logit|", True),
    "hidden_states_top1": ("largest |hidden state|", True),
    "noise_mass": ("attention noise mass (outside each query's 4 strongest keys)", True),
    "attention_entropy": ("attention entropy (nats)", None),
    "lambda": ("lambda (mean over layers)", None),
    "max_over_mean": ("routing: busiest expert's load / mean", True),
    "router_entropy": ("routing: router entropy / ln E", None),
    "specialisation_class": ("routing: first choice vs token class (NMI)", None),
    "params_total": ("parameters", None),
    "flops_per_token": ("forward FLOPs per token", None),
}
EXPLANATIONS = {
    "loss_curves.png": "Loss during training per mode (validation loss only where the runs evaluated, "
                       "train.eval_every > 0): the line is the mean over seeds, the band spans the lowest and highest "
                       "seed. Lower is better; where the bands overlap, the seeds do not separate the modes.",
    "needle.png": "Needle retrieval: the share of trials in which the planted value beats the distractor values, "
                  "by the needle's depth in the context (columns) and the context length (rows), mean over seeds. "
                  "Chance is in each panel's title; rows longer than the window test retrieval beyond it.",
    "outliers.png": "Activation outliers: the k-th largest absolute attention logit and hidden-state value, and "
                    "the median, on a log scale, mean over seeds (bars span min to max). Smaller top values "
                    "relative to the median mean fewer outliers.",
    "lambda.png": "Lambda over training per layer, mean over seeds: how much of the second attention map is "
                  "subtracted. diff: one lambda per layer (band: min to max over seeds); diff_v2: sigmoid(lambda) "
                  "per token and head (line: its mean, band: its 10th to 90th percentile).",
    "routing.png": "Routing per layer and mode (mean over seeds): the busiest expert's load over the mean load "
                   "(1 is perfect balance) and the router entropy over ln E (1 is uniform).",
}
COSTS = ("params_total", "flops_per_token")  # set by the shapes: in the table, not compared in sentences
COLOURS = {"standard": "tab:gray", "diff": "tab:blue", "diff_v2": "tab:orange"}


def runs_of(study: dict[str, Any], mode: str) -> list[dict[str, Any]]:
    return [run for run in study["runs"] if run["mode"] == mode]


def band(curves: list[list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Steps every curve has, and the mean, min and max over curves there."""
    steps = sorted(set.intersection(*(set(step for step, _ in curve) for curve in curves)))
    values = np.array([[dict(map(tuple, curve))[step] for step in steps] for curve in curves])
    return np.array(steps), values.mean(0), values.min(0), values.max(0)


def plot_loss_curves(study: dict[str, Any], out: Path) -> Path | None:
    """Validation and training loss per mode, each panel only where some run logged that loss."""
    plt = pyplot()
    panels = [(name, title) for name, title in (("val_loss", "validation loss"), ("loss", "training loss"))
              if any(run["curves"][name] for run in study["runs"])]
    if not panels:
        return None
    figure, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for axis, (name, title) in zip(axes[0], panels, strict=True):
        for mode in study["modes"]:
            curves = [run["curves"][name] for run in runs_of(study, mode) if run["curves"][name]]
            if not curves:
                continue
            steps, mean, low, high = band(curves)
            axis.plot(steps, mean, label=f"{mode} ({len(curves)} seeds)", color=COLOURS.get(mode))
            axis.fill_between(steps, low, high, alpha=0.25, color=COLOURS.get(mode))
        axis.set(title=title, xlabel="step", ylabel="nats per token")
        integer_ticks(axis)
        axis.legend(fontsize=8)
    return save(figure, out / "loss_curves.png")


def plot_needle(study: dict[str, Any], out: Path) -> Path | None:
    """Accuracy by depth and length (every run probes the same lengths); None where max_seq_len held no
    haystack."""
    lengths = list(study["runs"][0]["measured"]["needle"])
    if not lengths:
        return None
    plt = pyplot()
    modes = study["modes"]
    figure, axes = plt.subplots(1, len(modes), figsize=(4.2 * len(modes), 3.4), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        probes = [run["measured"]["needle"] for run in runs_of(study, mode)]
        depths = [depth["depth"] for depth in probes[0][lengths[0]]["depths"]]
        grid = np.array([[fmean(probe[length]["depths"][i]["accuracy"] for probe in probes)
                          for i in range(len(depths))] for length in lengths])
        heatmap(axis, grid, f"{mode} (chance {probes[0][lengths[0]]['chance']:.2f})", "depth", "context tokens",
                vmin=0, vmax=1)
        axis.set_xticks(range(len(depths)), [f"{depth:.1f}" for depth in depths])
        axis.set_yticks(range(len(lengths)), lengths)
    return save(figure, out / "needle.png")


def plot_outliers(study: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    modes, width = study["modes"], 0.8 / len(study["modes"])
    for axis, kind in zip(axes, PAPER_OUTLIERS, strict=True):
        for i, mode in enumerate(modes):
            values = np.array([[run["measured"]["attention"]["outliers"][kind][stat] for stat in OUTLIER_NAMES]
                               for run in runs_of(study, mode)])
            mean = values.mean(0)
            axis.bar(np.arange(len(OUTLIER_NAMES)) + i * width, mean, width, label=mode, color=COLOURS.get(mode),
                     yerr=[mean - values.min(0), values.max(0) - mean], capsize=2)
        axis.set_xticks(np.arange(len(OUTLIER_NAMES)) + width * (len(modes) - 1) / 2, OUTLIER_NAMES)
        axis.set(yscale="log", title=kind.replace("_", " "), ylabel="absolute value")
        axis.legend(fontsize=8)
    return save(figure, out / "outliers.png")


def plot_lambda(study: dict[str, Any], out: Path) -> Path | None:
    plt = pyplot()
    modes = [mode for mode in study["modes"] if any(run["curves"]["lambda"] for run in runs_of(study, mode))]
    if not modes:
        return None
    figure, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 3.6), squeeze=False)
    for axis, mode in zip(axes[0], modes, strict=True):
        runs = [run["curves"]["lambda"] for run in runs_of(study, mode) if run["curves"]["lambda"]]
        spreads = [run["curves"]["lambda_spread"] for run in runs_of(study, mode) if run["curves"]["lambda_spread"]]
        for layer in range(len(runs[0][0][1])):
            steps, mean, low, high = band([[[step, values[layer]] for step, values in curve] for curve in runs])
            line = axis.plot(steps, mean, label=f"layer {layer}")[0]
            if spreads:  # V2: the 10th to 90th percentile over tokens and heads, mean over seeds
                low = band([[[step, values[layer][0]] for step, values in curve] for curve in spreads])[1]
                high = band([[[step, values[layer][1]] for step, values in curve] for curve in spreads])[1]
            axis.fill_between(steps, low, high, alpha=0.2, color=line.get_color())
        kind = "mean, band p10-p90 over tokens and heads" if spreads else "band: min to max over seeds"
        axis.set(title=f"{mode}: lambda ({kind})", xlabel="step")
        integer_ticks(axis)
        axis.legend(fontsize=7)
    return save(figure, out / "lambda.png")


def plot_routing(study: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, 2, figsize=(11, 3.6))
    for axis, name, title in ((axes[0], "max_over_mean", "busiest expert / mean load"),
                              (axes[1], "router_entropy", "router entropy / ln E")):
        for mode in study["modes"]:
            values = np.array([run["measured"]["routing"][name] for run in runs_of(study, mode)])
            axis.plot(range(values.shape[1]), values.mean(0), "o-", label=mode, color=COLOURS.get(mode))
        axis.set(title=title, xlabel="layer")
        integer_ticks(axis)
        axis.legend(fontsize=8)
    return save(figure, out / "routing.png")


def number(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 1e5:
        return f"{value:.3g}"
    return f"{value:.4g}" if abs(value) >= 1 else f"{value:.4f}"


def spread_text(spread: dict[str, Any]) -> str:
    std = f" ± {number(spread['std'])}" if spread["std"] is not None else ""
    return f"{number(spread['mean'])}{std} [{number(spread['min'])}, {number(spread['max'])}]"


def verdict(mode: str, baseline: str, metric: str, difference: dict[str, Any]) -> str:
    """One plain sentence about a paired difference."""
    description, lower_better = METRICS[metric]
    n, mean = difference["n"], difference["mean"]
    direction = "higher" if mean > 0 else "lower"
    text = (f"{mode} − {baseline}, {description}: {number(mean)}" +
            (f" ± {number(difference['std'])}" if difference["std"] is not None else "") +
            f" over {n} seed{'s' if n > 1 else ''} ({direction} in {difference['same_sign_in']} of {n}). ")
    if n < 2:
        return text + "One seed has no spread: this says nothing about whether the modes differ."
    if difference["within_spread"]:
        return text + "Within the spread over seeds: no difference shown."
    better = "" if lower_better is None else (" (better)" if (mean < 0) == lower_better else " (worse)")
    return text + f"Larger than the spread over seeds: {mode} is {direction}{better}."


def final_table(study: dict[str, Any]) -> str:
    per_mode, modes = study["aggregate"]["per_mode"], study["modes"]
    rows = "".join(f"<tr><th>{html.escape(description)}</th>" + "".join(
        f"<td>{spread_text(per_mode[mode][metric]) if metric in per_mode[mode] else '–'}</td>" for mode in modes)
                   + "</tr>" for metric, (description, _) in METRICS.items())
    return ("<table><tr><th></th>" + "".join(f"<th>{mode}</th>" for mode in modes) + "</tr>" + rows + "</table>"
            "<p>Each cell: mean ± standard deviation [min, max] over seeds.</p>")


def outlier_table(study: dict[str, Any]) -> str:
    per_mode = study["aggregate"]["per_mode"]
    header = "<tr><th></th>" + "".join(f"<th>{stat}</th>" for stat in OUTLIER_NAMES) + "</tr>"
    parts = []
    for kind, paper in PAPER_OUTLIERS.items():
        rows = "".join(f"<tr><th>paper: {name}</th>" + "".join(f"<td>{value}</td>" for value in values) + "</tr>"
                       for name, values in paper.items())
        rows += "".join(f"<tr><th>this study: {mode}</th>" + "".join(
            f"<td>{number(per_mode[mode][f'{kind}_{stat}']['mean'])}</td>" for stat in OUTLIER_NAMES) + "</tr>"
                        for mode in study["modes"])
        parts.append(f"<h3>{kind.replace('_', ' ')}</h3><table>{header}{rows}</table>")
    return "".join(parts) + ("<p>The paper's rows are its Table 5: 3B models trained on 350B tokens, statistics over "
                             "0.4M tokens. This study's rows are means over seeds of models of its own size, over "
                             f"{study['runs'][0]['measured']['outlier_tokens']:,} held-out tokens; "
                             "compare the ratios between rows, not the magnitudes.</p>")


def write_report(study: dict[str, Any], out: Path) -> list[Path]:
    """The PNGs and report.html in `out`; returns the PNGs."""
    images = [plot_loss_curves(study, out), plot_needle(study, out), plot_outliers(study, out),
              plot_lambda(study, out), plot_routing(study, out)]
    images = [image for image in images if image is not None]
    baseline, paired = study["baseline"], study["aggregate"]["paired_with_baseline"]
    sentences = "".join(f"<li>{html.escape(verdict(mode, baseline, metric, differences[metric]))}</li>"
                        for mode, differences in paired.items() for metric in METRICS
                        if metric in differences and metric not in COSTS)
    first = study["runs"][0]
    settings = (f"<p>Modes {', '.join(study['modes'])}; seeds {', '.join(map(str, study['seeds']))}; "
                f"{study['config']['train']['max_steps']} steps of {study['config']['train']['batch_size']} x "
                f"{study['config']['train']['seq_len']} tokens each; the runs of one seed have the same data order "
                f"and start their shared parameters equal{' (the resized experts excepted)' if study['notes'] else ''}."
                f" Measured on {first['measured']['val_tokens']:,} held-out tokens. "
                f"{'Total parameters matched.' if study['match'] == 'params' else 'Shapes as configured.'}</p>"
                + "".join(f"<p>{html.escape(note)}</p>" for note in study["notes"]))
    figures = "".join(f'<figure><img src="{image.name}" alt="{image.stem}"><figcaption>'
                      f'{html.escape(EXPLANATIONS[image.name])}</figcaption></figure>' for image in images)
    body = (f"{settings}<h2>Differences from {baseline}, paired by seed</h2><ul>{sentences or '<li>none</li>'}</ul>"
            f"<p>A difference is outside the spread over seeds only when every seed's difference has the same sign "
            f"and their mean is larger than their standard deviation; otherwise it is within it, and the seeds do "
            f"not show that the modes differ.</p><h2>Final numbers</h2>{final_table(study)}"
            f"<h2>Activation outliers beside the paper's</h2>{outlier_table(study)}<h2>Plots</h2>{figures}")
    write_text(html_page("Attention modes compared", body), out / "report.html")
    return images
