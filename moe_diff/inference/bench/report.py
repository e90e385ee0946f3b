"""The inference benchmark's outputs: a JSON file with everything, a Markdown table and a PNG plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_diff.files import write_json
from moe_diff.plotting import pyplot, save


def shown(value: float | None, spec: str, scale: float = 1.0) -> str:
    """A table cell: `value` times `scale` in `spec`, or n/a where the system does not report it."""
    return "n/a" if value is None else format(value * scale, spec)


def markdown(results: dict[str, Any]) -> str:
    """One row per system, prompt length and batch size, then this project's speed-ups over the others."""
    env = results["environment"]
    cfg, bandwidth = results["model"], results["bandwidth_bytes_per_s"]
    compiled = "; moe-diff eager and compiled, vLLM and dense compiled" if results["settings"]["compile"] else ""
    lines = [
        f"Device: {env['device_name']} ({env['device']}, {env['torch_threads']} threads), torch "
        f"{env['versions']['torch']}, commit {env['commit']}. Model: dim {cfg['dim']}, {cfg['n_layers']} layers, "
        f"{cfg['n_experts']} experts top-{cfg['top_k']}, ffn {cfg['ffn_dim']}, {cfg['attention']} attention, window "
        f"{cfg['sliding_window']}, {results['dtype']}. Routing: {results['routing']}. {results['new_tokens']} new "
        f"tokens per generation, {results['settings']['repeats']} timed rounds{compiled}. Measured bandwidth: copy "
        f"{bandwidth['copy'] / 1e9:.1f} GB/s (read + written), read {bandwidth['read'] / 1e9:.1f} GB/s.",
        "",
        "| system | prompt | batch | TTFT ms | prefill tok/s | decode tok/s | ITL p50 ms | ITL p90 ms | ITL p99 ms "
        "| experts read/step | GB/s | of peak | peak memory GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results["runs"]:
        memory = shown(r["peak_memory_bytes"], ".2f", 2**-30)
        lines.append(
            f"| {r['system']} | {r['prompt_length']} | {r['batch']} | {r['ttft_s'] * 1e3:.1f} | "
            f"{r['prefill_tokens_per_s']:.0f} | {r['decode_tokens_per_s']:.1f} | {r['itl_p50_s'] * 1e3:.2f} | "
            f"{r['itl_p90_s'] * 1e3:.2f} | {r['itl_p99_s'] * 1e3:.2f} | {shown(r['experts_read_per_step'], '.1f')} | "
            f"{shown(r['bandwidth_bytes_per_s'], '.2f', 1e-9)} | {shown(r['bandwidth_share'], '.0%')} | {memory} |")
    if results["speedups"]:
        lines += ["", "| this project | versus | prompt | batch | decode speed-up | prefill speed-up |",
                  "|---|---|---:|---:|---:|---:|"]
        lines += [f"| {s['system']} | {s['versus']} | {s['prompt_length']} | {s['batch']} | {s['decode']:.2f}x | "
                  f"{s['prefill']:.2f}x |" for s in results["speedups"]]
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], path: Path) -> Path:
    """Decode tokens/s and median inter-token latency against batch size, a line per system and prompt length."""
    plt = pyplot()
    figure, (speed, latency) = plt.subplots(1, 2, figsize=(11, 4))
    series: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in results["runs"]:
        series.setdefault((r["system"], r["prompt_length"]), []).append(r)
    for (system, prompt_length), rows in series.items():
        rows.sort(key=lambda r: r["batch"])
        batches = [r["batch"] for r in rows]
        label = f"{system}, prompt {prompt_length}"
        speed.plot(batches, [r["decode_tokens_per_s"] for r in rows], "o-", label=label)
        latency.plot(batches, [r["itl_p50_s"] * 1e3 for r in rows], "o-", label=label)
    for axis, title, unit in ((speed, "Decode throughput", "tokens/s"), (latency, "Inter-token latency (p50)", "ms")):
        axis.set(xscale="log", yscale="log", xlabel="batch size", ylabel=unit, title=title)
        axis.legend(fontsize=7)
    return save(figure, path, dpi=100)


def write(results: dict[str, Any], stem: Path) -> list[Path]:
    """STEM.json, STEM.md and STEM.png; the JSON is written last."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table = stem.with_suffix(".md")
    table.write_text(markdown(results))
    picture = plot(results, stem.with_suffix(".png"))
    return [write_json(results, stem.with_suffix(".json")), table, picture]
