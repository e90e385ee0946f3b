"""`moe-diff info`: what a config costs (parameters, FLOPs, KV cache) in each attention mode, without building it;
optionally one forward and backward pass of a freshly initialised model."""

from __future__ import annotations

import dataclasses

import torch
from rich.console import Console
from rich.table import Table

from moe_diff import costs
from moe_diff.config import ATTENTION_MODES, Config, ConfigError, ModelConfig, load_config
from moe_diff.device import DTYPES
from moe_diff.errors import literal
from moe_diff.parallel.context_parallel import context_shares
from moe_diff.training.smoke import forward_check

DEFAULT_SEQ_LEN = 4096  # the length FLOPs and cache sizes are given for, unless max_seq_len is shorter
FORWARD_CHECK_SEQ_LEN = 256


def _human(value: float, unit: str = "", base: int = 1000) -> str:
    """3 significant digits with a decimal (K, M, G) or binary (Ki, Mi, Gi) prefix."""
    prefixes = ["", "K", "M", "G", "T", "P"] if base == 1000 else ["", "Ki", "Mi", "Gi", "Ti", "Pi"]
    exponent = 0
    while abs(value) >= base and exponent < len(prefixes) - 1:
        value, exponent = value / base, exponent + 1
    return f"{value:.3g} {prefixes[exponent]}{unit}".rstrip()


def _mode_rows(cfg: ModelConfig, seq_len: int, kv_bytes: int) -> dict[str, list[str]]:
    """One column of the comparison table per attention mode (n/a where the shapes forbid it)."""
    columns = {}
    for mode in ATTENTION_MODES:
        try:
            variant = dataclasses.replace(cfg, attention=mode)
        except ConfigError as error:
            columns[mode] = [f"n/a: {error}"] + [""] * 6
            continue
        params, flops = costs.param_counts(variant), costs.flops_per_token(variant, seq_len)
        columns[mode] = [
            _human(params.total), _human(params.active), _human(params.attention_per_layer),
            _human(flops.total, "FLOP"), f"{flops.attention / flops.total:.1%}",
            _human(costs.kv_cache_bytes_per_token(variant, kv_bytes), "B", 1024),
            _human(costs.kv_cache_bytes_per_sequence(variant, seq_len, kv_bytes), "B", 1024),
        ]
    return columns


def print_info(config: str, overrides: list[str], seq_len: int | None, kv_dtype: str, forward: bool,
               console: Console) -> None:
    """A config's parameters, the three attention modes' costs on its shapes, and with `forward` one pass of a
    freshly initialised model."""
    job = load_config(config, overrides)
    cfg = job.model
    seq_len = seq_len or min(cfg.max_seq_len, DEFAULT_SEQ_LEN)
    kv_bytes = DTYPES[kv_dtype].itemsize
    params = costs.param_counts(cfg)
    window = "full causal" if cfg.sliding_window is None else f"window {cfg.sliding_window}"
    console.print(f"[bold]{literal(config)}[/]: attention={cfg.attention}, {cfg.n_layers} layers, dim {cfg.dim}, "
                  f"{cfg.n_experts} experts top-{cfg.top_k}, {window}")

    table = Table(title="Parameters")
    table.add_column("")
    table.add_column("count", justify="right")
    table.add_row("total", f"{params.total:,}")
    table.add_row("active per token", f"{params.active:,}")
    table.add_row("embedding (input + untied output)", f"{params.embedding:,}")
    table.add_row("experts, all", f"{params.experts_total:,}")
    table.add_row("experts, active per token", f"{params.experts_active:,}")
    table.add_row("active per token, without embedding", f"{params.active - params.embedding:,}")
    console.print(table)

    labels = ["params total", "params active per token", "attention params per layer",
              f"forward FLOPs per token (seq {seq_len})", "of which attention scores",
              f"KV cache per token ({kv_dtype})", f"KV cache per sequence of {seq_len}"]
    compare = Table(title="Attention modes on these shapes (configured one marked *)")
    compare.add_column("")
    columns = _mode_rows(cfg, seq_len, kv_bytes)
    for mode in columns:
        compare.add_column(mode + (" *" if mode == cfg.attention else ""), justify="right")
    for i, label in enumerate(labels):
        compare.add_row(label, *(column[i] for column in columns.values()))
    console.print(compare)

    if job.parallel.cp > 1:
        _print_context_parallel(job, console)
    if forward:
        _print_forward_check(cfg, min(seq_len, FORWARD_CHECK_SEQ_LEN), console)


def _context_column(cfg: ModelConfig, n_ranks: int, seq_len: int, window: int | None, tp: int,
                    bytes_per_element: int) -> list[str]:
    """One layout's column: the busiest rank's share of one layer's attention over one sequence ("n/a" where the
    length does not split into the layout's blocks or chunks)."""
    try:
        shares = context_shares(n_ranks, seq_len, window)
    except ConfigError as error:
        return [f"n/a: {error}"] + [""] * 7
    busiest = max(shares, key=lambda share: (share.pairs, share.keys))
    widths = costs.attention_widths(cfg, tp)
    fused = costs.fused_attention_bytes(busiest.queries, busiest.keys, widths, bytes_per_element)
    return [
        f"{busiest.queries:,}", f"{busiest.keys:,}",
        _human(max(share.received for share in shares) * widths.key_value * bytes_per_element, "B", 1024),
        f"{min(share.pairs for share in shares) / busiest.pairs:.0%}",
        _human(fused, "B", 1024), _human(fused * cfg.n_layers, "B", 1024),
        _human(busiest.blocks * widths.maps * 4, "B", 1024),  # in float32, the backends' compute type
        _human(busiest.blocks, "B", 1024),
    ]


def _print_context_parallel(job: Config, console: Console) -> None:
    """Each rank's attention memory and exchange over one training sequence, against one rank, for the configured
    window and without one, in the precision training runs in on a GPU (train.precision)."""
    cfg, cp, tp, seq_len = job.model, job.parallel.cp, job.parallel.tp, job.train.seq_len
    dtype = "float32" if job.train.precision == "float32" else "bfloat16"  # auto: bfloat16 autocast on CUDA
    layouts = {"one rank": (1, cfg.sliding_window), f"cp={cp}": (cp, cfg.sliding_window)}
    if cfg.sliding_window is not None:
        layouts = {f"one rank, window {cfg.sliding_window}": layouts["one rank"],
                   f"cp={cp}, window {cfg.sliding_window}": layouts[f"cp={cp}"],
                   "one rank, no window": (1, None), f"cp={cp}, no window": (cp, None)}
    table = Table(title=f"Context parallelism: one training sequence of {seq_len:,} tokens (train.seq_len), one "
                        f"layer, the busiest rank{f' of tp={tp}' if tp > 1 else ''}, activations in {dtype}")
    table.add_column("")
    columns = [_context_column(cfg, n_ranks, seq_len, window, tp, DTYPES[dtype].itemsize)
               for n_ranks, window in layouts.values()]
    for name in layouts:
        table.add_column(name, justify="right")
    labels = ["positions held (queries)", "positions attended (keys, own included)",
              "keys + values a rank receives per layer, at most (gradients sent back alike)",
              "work of the least busy rank / the busiest",
              "attention kept for the backward, fused kernel, per layer", f"  all {cfg.n_layers} layers",
              "score maps, CPU SDPA (a short window in query blocks), float32, per layer",
              "bool mask, CPU SDPA (whole, or a short window's blocks; training batches carry document ids), "
              "per eager forward"]
    for i, label in enumerate(labels):
        table.add_row(label, *(column[i] for column in columns))
    console.print(table)


def _print_forward_check(cfg: ModelConfig, seq_len: int, console: Console) -> None:
    check = forward_check(cfg, batch=2, seq_len=seq_len)
    console.print(f"forward+backward of 2 x {seq_len} random tokens (float32, CPU threads "
                  f"{torch.get_num_threads()}): loss {check.loss:.3f} (uniform ln V = "
                  f"{check.uniform_loss:.3f}), aux loss {check.aux_loss:.4f}, {check.seconds:.2f} s")
    table = Table(title="Share of (token, slot) assignments per expert at initialisation")
    table.add_column("layer")
    for e in range(cfg.n_experts):
        table.add_column(f"e{e}", justify="right")
    for layer, shares in enumerate(check.expert_share):
        table.add_row(str(layer), *(f"{s:.0%}" for s in shares))
    console.print(table)
