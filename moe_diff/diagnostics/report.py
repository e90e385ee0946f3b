"""Pictures and pages of routing statistics: PNG plots, one report.html, a terminal summary."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from moe_diff.plotting import heatmap, integer_ticks, pyplot, save


def plot_load(stats: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    height = 1.0 + 0.35 * max(stats["n_layers"], 4)  # room for the colour bar when there are few layers
    figure, axis = plt.subplots(figsize=(1.2 + 0.5 * stats["n_experts"], height))
    heatmap(axis, [layer["utilisation"] for layer in stats["layers"]], "Load / ideal load", "expert", "layer",
             vmin=0)
    return save(figure, out / "load_heatmap.png")


def plot_layers(stats: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    layers = range(stats["n_layers"])
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.plot(layers, [s["router_entropy"] for s in stats["layers"]], "o-", label="entropy / ln E")
    left.plot(layers, [s["router_diversity"] for s in stats["layers"]], "s-", label="exp(H) / E")
    left.set(title="Router entropy", xlabel="layer", ylim=(0, 1.05))
    left.legend()
    right.plot(layers, [s["max_over_mean"] for s in stats["layers"]], "o-", label="max / mean")
    right.plot(layers, [s["utilisation_summary"]["min"] for s in stats["layers"]], "s-", label="min / mean")
    right.axhline(2.0, color="red", linestyle=":", label="flag at 2")
    right.set(title="Expert load", xlabel="layer")
    right.legend()
    integer_ticks(left)
    integer_ticks(right)
    return save(figure, out / "layers.png")


def plot_coactivation(stats: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    n = stats["n_layers"]
    columns = min(n, 4)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    for layer, axis in enumerate(axes.flat):
        if layer < n:
            heatmap(axis, stats["layers"][layer]["coactivation"], f"layer {layer}", "expert", "expert", vmin=0)
        else:
            axis.axis("off")
    return save(figure, out / "coactivation.png")


def plot_training_load(records: list[dict[str, Any]], out: Path) -> Path | None:
    """Each layer's expert shares against training step, from a run's metrics.jsonl."""
    records = [r for r in records if r.get("expert_share")]
    if len(records) < 2:
        return None
    plt = pyplot()
    n = len(records[0]["expert_share"])
    columns = min(n, 4)
    rows = -(-n // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.8 * rows), squeeze=False)
    steps = [r["step"] for r in records]
    half = (steps[-1] - steps[0]) / (len(steps) - 1) / 2  # each column centred on its step
    for layer, axis in enumerate(axes.flat):
        if layer >= n:
            axis.axis("off")
            continue
        shares = [[r["expert_share"][layer][e] for r in records] for e in range(len(records[0]["expert_share"][0]))]
        heatmap(axis, shares, f"layer {layer}: share", "step", "expert", vmin=0,
                extent=(steps[0] - half, steps[-1] + half, len(shares) - 0.5, -0.5))
    return save(figure, out / "training_load.png")


def plot_comparison(comparison: dict[str, Any], out: Path) -> Path:
    plt = pyplot()
    layers = range(len(comparison["layers"]))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    for key, label in (("top1_changed", "first choice changed"), ("topk_set_changed", "chosen set changed"),
                       ("top1_changed_after_matching", "first choice changed, experts matched")):
        axis.plot(layers, [layer[key] for layer in comparison["layers"]], "o-", label=label)
    axis.set(title="Routing change between checkpoints", xlabel="layer", ylabel="share of tokens", ylim=(0, 1.05))
    axis.legend()
    integer_ticks(axis)
    return save(figure, out / "comparison.png")


EXPLANATIONS = {
    "load_heatmap.png": "Each cell is an expert's load divided by the load it would carry if routing were "
                        "perfectly even: 1 is ideal, 0 is a dead expert, bright cells are overloaded experts.",
    "layers.png": "Left: how undecided the router is, averaged over tokens (1 = uniform over experts). Right: "
                  "the busiest and idlest expert's load relative to the mean; above the dotted line a layer is "
                  "flagged.",
    "coactivation.png": "How often two experts are chosen together for one token (diagonal: how often each "
                        "expert is chosen at all); bright off-diagonal cells are experts that work as a pair.",
    "training_load.png": "Each expert's share of the assignments (rows) over training steps (columns): watch for "
                         "rows that fade to zero (dying experts) or dominate.",
    "attention_maps.png": "Head 0 of the first sequence in each layer: the two softmax maps and the map "
                          "actually applied to the values (their difference in the diff modes, red above 0, blue "
                          "below, white at 0); grey cells are keys the query cannot see. A sharp combined map with "
                          "a faint background is the noise cancelling at work.",
    "comparison.png": "Share of tokens whose routing differs between the two checkpoints, before and after "
                      "matching experts one to one (experts can swap labels between runs).",
}


def _attention_table(stats: dict[str, Any]) -> str:
    """Per-layer attention measures, with those of a compared checkpoint beside them when present."""
    runs = [("", stats["attention"])] + ([("compared ", stats["attention_compare"])]
                                         if "attention_compare" in stats else [])
    header = "".join(f"<th>{who}{html.escape(run['attention'])}: {name}</th>" for who, run in runs
                     for name in ("lambda", "noise mass", "entropy", "max |h|"))
    rows = ""
    for i in range(len(stats["attention"]["layers"])):
        cells = ""
        for _, run in runs:
            layer = run["layers"][i]
            lam = layer.get("lambda", "")
            lam = f"{lam['mean']:.3f} ({lam['p10']:.2f}-{lam['p90']:.2f})" if isinstance(lam, dict) else (
                f"{lam:.3f}" if lam != "" else "—")
            cells += (f"<td>{lam}</td><td>{layer['noise_mass']:.3f}</td><td>{layer['entropy']:.3f}</td>"
                      f"<td>{layer['max_activation']:.1f}</td>")
        rows += f"<tr><td>{i}</td>{cells}</tr>"
    probes = [(who, run, length, probe) for who, run in runs for length, probe in run.get("needle", {}).items()]
    needle = "".join(
        f"<tr><td>{who}{html.escape(run['attention'])}</td><td>{length}</td>" + "".join(
            f"<td>{d['accuracy']:.2f} ({d['value_log_likelihood']:.1f})</td>" for d in probe["depths"]) + "</tr>"
        for who, run, length, probe in probes)
    if needle:
        first = probes[0][3]
        depths = "".join(f"<th>depth {d['depth']:.0%}</th>" for d in first["depths"])
        needle = ("<h3>Needle retrieval</h3><p>A key planted among distractor key-value lines filling a context of "
                  "the given length in tokens; accuracy is how often the model prefers the planted value to 4 other "
                  f"values of the context (chance {first['chance']:.2f}); in brackets the planted value's "
                  f"log-likelihood.</p><table><tr><th>model</th><th>context</th>{depths}</tr>{needle}</table>")
    return ("<h2>Attention</h2><p>Lambda: the weight of the second map (V2: mean and 10th-90th percentile over "
            "tokens). Noise mass: share of each query's absolute attention outside its 4 strongest keys. Entropy: "
            "of the absolute attention weights, in nats. Max |h|: largest activation in the layer's output.</p>"
            f"<table><tr><th>layer</th>{header}</tr>{rows}</table>{needle}")


def html_page(title: str, body: str) -> str:
    """A self-contained HTML page of the reports: the title as heading, then `body`."""
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:70em;margin:2em auto}}td,th{{padding:2px 8px;text-align:right}}
figure{{margin:1.5em 0}}img{{max-width:100%}}figcaption{{color:#444}}</style></head>
<body><h1>{html.escape(title)}</h1>
{body}</body></html>
"""


def write_html(stats: dict[str, Any], images: list[Path], out: Path, title: str) -> Path:
    """One self-contained page: flags, per-layer tables, and every plot with a sentence on reading it."""
    comparison = stats.get("comparison")
    rows = "".join(
        f"<tr><td>{i}</td><td>{s['max_over_mean']:.2f}</td><td>{len(s['dead_experts'])}</td>"
        f"<td>{len(s['near_dead_experts'])}</td><td>{s['router_entropy']:.3f}</td>"
        f"<td>{s['top1_top2_margin']:.3f}</td><td>{s['consecutive']['top1_same']:.3f} "
        f"({s['consecutive']['top1_random']:.3f})</td>"
        f"<td>{s['specialisation']['class']['normalised_mutual_information']:.3f}</td></tr>"
        for i, s in enumerate(stats["layers"]))
    flags = "".join(f"<li>{html.escape(flag)}</li>" for flag in stats["flags"]) or "<li>none</li>"
    figures = "".join(f'<figure><img src="{image.name}" alt="{image.stem}"><figcaption>'
                      f'{html.escape(EXPLANATIONS[image.name])}</figcaption></figure>' for image in images)
    compared = ""
    if comparison is not None:
        compared = "<h2>Comparison</h2><table><tr><th>layer</th><th>first choice changed</th><th>set changed</th>" \
                   "<th>Jaccard</th><th>matching (ours → theirs)</th></tr>" + "".join(
                       f"<tr><td>{i}</td><td>{c['top1_changed']:.3f}</td><td>{c['topk_set_changed']:.3f}</td>"
                       f"<td>{c['jaccard']:.3f}</td><td>{c['matching']}</td></tr>"
                       for i, c in enumerate(comparison["layers"])) + "</table>"
    body = f"""<p>{stats['n_tokens']:,} tokens, {stats['n_layers']} layers, {stats['n_experts']} experts,
top-{stats['top_k']}, {stats['capacity']['mode']} ({stats['capacity']['dropped_assignments']} (token, slot)
assignments dropped).</p>
<h2>Problems</h2><ul>{flags}</ul>
<h2>Per layer</h2>
<p>Max/mean: busiest expert's load over the mean. Entropy: router entropy / ln E. Margin: top-1 minus top-2
probability. Consecutive: share of neighbouring tokens with the same first choice (random routing with these
loads in brackets). Class MI: how much the token's class decides its first choice (0 none, 1 fully).</p>
<table><tr><th>layer</th><th>max/mean</th><th>dead</th><th>near-dead</th><th>entropy</th><th>margin</th>
<th>consecutive</th><th>class MI</th></tr>{rows}</table>
{compared}
{_attention_table(stats) if "attention" in stats else ""}
<h2>Plots</h2>{figures}
"""
    path = out / "report.html"
    path.write_text(html_page(title, body))
    return path


def print_summary(stats: dict[str, Any], console: Console) -> None:
    table = Table(title="Routing by layer (problems in red)", box=box.SIMPLE_HEAD)
    for column in ("layer", "max/mean", "dead", "near-dead", "entropy", "same 1st (random)"):
        table.add_column(column, justify="right", no_wrap=True)
    for i, s in enumerate(stats["layers"]):
        bad = s["max_over_mean"] > 2 or s["dead_experts"] or s["router_entropy"] < 0.1
        table.add_row(str(i), f"{s['max_over_mean']:.2f}", str(len(s["dead_experts"])),
                      str(len(s["near_dead_experts"])), f"{s['router_entropy']:.2f}",
                      f"{s['consecutive']['top1_same']:.2f} ({s['consecutive']['top1_random']:.2f})",
                      style="red" if bad else None)
    console.print(table)
    for flag in stats["flags"]:
        console.print(f"[red]problem:[/] {flag}")
    if not stats["flags"]:
        console.print("no routing problems found")
