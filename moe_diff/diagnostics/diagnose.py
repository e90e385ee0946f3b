"""`moe-diff diagnose`: where tokens go, layer by layer, from a checkpoint, a run or a trace file, written as
stats.json, plots and an HTML report."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from moe_diff.checkpoint.open import open_model
from moe_diff.config import AUTO_KERNELS, DataConfig, Kernels
from moe_diff.data import Batch, Tokenizer, check_vocabulary, load_corpus, validation_batches
from moe_diff.diagnostics.attention import attention_stats, plot_maps
from moe_diff.diagnostics.compare import compare_traces
from moe_diff.diagnostics.needle import check_needle_lengths, needle_probes, shortest_context
from moe_diff.diagnostics.report import (
    plot_coactivation,
    plot_comparison,
    plot_layers,
    plot_load,
    plot_training_load,
    print_summary,
    write_html,
)
from moe_diff.diagnostics.routing import routing_stats
from moe_diff.errors import literal, teller
from moe_diff.model import MoEDiffTransformer
from moe_diff.routing.collect import collect_trace
from moe_diff.routing.trace import RoutingTrace, TraceError, is_trace, load_trace, save_trace
from moe_diff.runs import METRICS_FILE, read_metrics

NEEDLE_CONTEXT = 1024  # the needle probe's default context: the most tokens it reads (at most max_seq_len)


@dataclass
class Target:
    """What `diagnose` examines: a routing trace, and the model, text and tokens behind it when it ran one."""

    trace: RoutingTrace
    run_dir: Path | None = None
    data: DataConfig | None = None  # where the routed text came from
    model: MoEDiffTransformer | None = None
    batches: list[tuple[Batch, torch.Tensor]] | None = None
    tokenizer: Tokenizer | None = None
    read_with: str | None = None  # the name of the tokenizer that read the text, where it can be read again


def load_target(path: Path, data: DataConfig | None, tokenizer: str | None, seq_len: int, max_tokens: int,
                console: Console, kernels: Kernels) -> Target:
    """Read a trace file, or run a checkpoint (on `kernels`) on the validation split of `data` (default: its run's
    text, else the built-in corpus) read with `tokenizer` (default: the checkpoint's, StoredModel.tokenizer), and
    trace its routing."""
    if path.is_file() and is_trace(path):  # its tokens were read with the tokenizer its header names
        trace = load_trace(path)
        named = tokenizer or trace.header.get("tokenizer")
        readable = named == "byte" or (named is not None and Path(named).is_file())
        return Target(trace, data=data, read_with=named if readable else None)
    tell = teller(console)
    stored = open_model(path, tell=tell, kernels=kernels)
    text_tokenizer = stored.tokenizer(tokenizer)
    data = dataclasses.replace(data or stored.data or DataConfig(), tokenizer=text_tokenizer.name)
    model = stored.model.float()
    corpus = load_corpus(data, text_tokenizer, tell=tell)
    check_vocabulary(model.cfg.vocab_size, text_tokenizer, corpus.vocab_size)
    batches = validation_batches(corpus, min(seq_len, model.cfg.max_seq_len), max_tokens)
    header = {"source": f"diagnose {stored.path}", "tokenizer": text_tokenizer.name, "model": vars(model.cfg)}
    return Target(collect_trace(model, batches, corpus.val_names, header, progress=True), stored.run_dir, data, model,
                  batches, text_tokenizer, text_tokenizer.name)


def default_needle_length(max_seq_len: int, tokenizer: Tokenizer, console: Console) -> list[int]:
    """[NEEDLE_CONTEXT tokens, at most max_seq_len], or [] (said) when max_seq_len holds no haystack."""
    length, shortest = min(NEEDLE_CONTEXT, max_seq_len), shortest_context(tokenizer)
    if length >= shortest:
        return [length]
    console.print(f"no needle probe: max_seq_len {max_seq_len} holds no haystack (at least {shortest} tokens)",
                  highlight=False)
    return []


def diagnose(target: str | Path, out: str | Path, data: DataConfig | None = None, tokenizer: str | None = None,
             compare: str | Path | None = None, trace_path: str | Path | None = None, seq_len: int = 256,
             max_tokens: int = 16384, attention: bool = False, console: Console | None = None,
             kernels: Kernels = AUTO_KERNELS, needle_lengths: list[int] | None = None) -> dict[str, Any]:
    """Trace (or read) the routing of `target`, write stats.json, plots and report.html to `out`. A checkpoint runs
    on the validation split of `data`'s sources (default: its run's) read with `tokenizer` (default: its own).

    With `attention`, also lambda, attention maps, noise mass, entropy, activation outliers and the needle probe at
    `needle_lengths` tokens (default NEEDLE_CONTEXT, at most max_seq_len) (of `compare` too when it is a checkpoint).
    """
    console = console or Console()
    ours = load_target(Path(target), data, tokenizer, seq_len, max_tokens, console, kernels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if trace_path is not None:
        save_trace(ours.trace, trace_path)
    stats = routing_stats(ours.trace)
    images = [plot_load(stats, out), plot_layers(stats, out), plot_coactivation(stats, out)]
    if ours.run_dir is not None and (ours.run_dir / METRICS_FILE).is_file():
        training = plot_training_load(read_metrics(ours.run_dir / METRICS_FILE), out)
        images += [training] if training else []
    theirs = None
    if compare is not None:
        theirs = load_target(Path(compare), ours.data, ours.read_with, trace_seq_len(ours.trace), ours.trace.n_tokens,
                             console, kernels)
        stats["comparison"] = compare_traces(ours.trace, theirs.trace)
        images.append(plot_comparison(stats["comparison"], out))
    if attention:
        if ours.model is None:
            raise TraceError("attention diagnostics need a checkpoint, not a trace file")
        lengths = needle_lengths or default_needle_length(ours.model.cfg.max_seq_len, ours.tokenizer, console)
        compared = theirs.model if theirs is not None else None
        for model in [model for model in (ours.model, compared) if model is not None]:  # both before either runs
            check_needle_lengths(lengths, model.cfg.max_seq_len, ours.tokenizer)
        stats["attention"], maps = attention_stats(ours.model, ours.batches[0][0])
        stats["attention"]["needle"] = needle_probes(ours.model, ours.tokenizer, lengths)
        images.append(plot_maps(maps, out))
        if compared is not None:
            stats["attention_compare"], _ = attention_stats(compared, ours.batches[0][0])
            stats["attention_compare"]["needle"] = needle_probes(compared, ours.tokenizer, lengths)
    (out / "stats.json").write_text(json.dumps(stats, indent=1))
    write_html(stats, images, out, f"Routing of {target}")
    print_summary(stats, console)
    console.print(f"wrote {literal(out / 'stats.json')}, {len(images)} plots and {literal(out / 'report.html')}")
    return stats


def trace_seq_len(trace: RoutingTrace) -> int:
    """The sequence length a trace was collected with (its sequences are equally long)."""
    return int(torch.bincount(trace.sequence_ids)[0])
