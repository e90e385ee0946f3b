"""The `moe-diff` command line: parses arguments and calls one function per subcommand."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress, TextColumn
from rich.table import Table
from rich.text import Text

from moe_diff import bench, checkpoint, costs, interop, train_checkpoint
from moe_diff.bench import report as bench_report
from moe_diff.bench.routing import ROUTING_MODES
from moe_diff.config import ATTENTION_MODES, ConfigError, DataConfig, ModelConfig, load_config
from moe_diff.data import check_vocabulary, load_tokenizer, tokenize_corpus
from moe_diff.diagnostics import diagnose
from moe_diff.diagnostics.collect import trace_sequences
from moe_diff.diagnostics.trace import save_trace
from moe_diff.errors import UsageError, run_reporting_errors
from moe_diff.generation import stream
from moe_diff.model import MoEDiffTransformer
from moe_diff.plots import plot_metrics
from moe_diff.smoke import forward_check
from moe_diff.train import train

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

console = Console()
errors = Console(stderr=True)


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


def run_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides).model
    seq_len = args.seq_len or min(cfg.max_seq_len, 4096)
    kv_bytes = torch.empty((), dtype=DTYPES[args.kv_dtype]).element_size()
    params = costs.param_counts(cfg)
    window = "full causal" if cfg.sliding_window is None else f"window {cfg.sliding_window}"
    console.print(f"[bold]{args.config}[/]: attention={cfg.attention}, {cfg.n_layers} layers, dim {cfg.dim}, "
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
              f"KV cache per token ({args.kv_dtype})", f"KV cache per sequence of {seq_len}"]
    compare = Table(title="Attention modes on these shapes (configured one marked *)")
    compare.add_column("")
    columns = _mode_rows(cfg, seq_len, kv_bytes)
    for mode in columns:
        compare.add_column(mode + (" *" if mode == cfg.attention else ""), justify="right")
    for i, label in enumerate(labels):
        compare.add_row(label, *(column[i] for column in columns.values()))
    console.print(compare)

    if args.forward:
        _print_forward_check(cfg, min(seq_len, 256))
    return 0


def _print_forward_check(cfg: ModelConfig, seq_len: int) -> None:
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


def _open(path: Path, dtype: torch.dtype | None = None) -> train_checkpoint.StoredModel:
    """open_model, telling the user which checkpoint it opened and which newer ones it skipped."""
    stored = train_checkpoint.open_model(path, dtype=dtype)
    for note in stored.notes():
        errors.print(note, highlight=False, soft_wrap=True)
    return stored


def run_convert(args: argparse.Namespace) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"destination {dst} exists and is not empty; refusing to overwrite it")
    dtype = DTYPES[args.dtype] if args.dtype else None
    if (src / "config.json").is_file():
        model = interop.from_hf_mixtral(src, dtype=dtype)
        checkpoint.save(model, dst)
        console.print(f"imported Mixtral {src} -> moe-diff checkpoint {dst}")
    elif (src / checkpoint.CONFIG_FILE).is_file():
        model = checkpoint.load(src, dtype=dtype)
        interop.to_hf_mixtral(model, dst)
        console.print(f"exported moe-diff checkpoint {src} -> Mixtral {dst}")
    else:
        raise UsageError(f"{src} is neither a Mixtral directory (config.json) nor a moe-diff "
                                f"checkpoint ({checkpoint.CONFIG_FILE})")
    return 0


def run_export(args: argparse.Namespace) -> int:
    """A run's newest checkpoint (or a given one), verified with its expert table, as one file."""
    dst = Path(args.dst)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise UsageError(f"destination {dst} exists and is not empty; refusing to overwrite it")
    stored = _open(Path(args.source), dtype=DTYPES[args.dtype] if args.dtype else None)
    model = stored.model
    if args.format == "mixtral":
        interop.to_hf_mixtral(model, dst)
    else:
        checkpoint.save(model, dst)
    console.print(f"exported {stored.path} -> {dst} ({args.format})")
    return 0


def run_train(args: argparse.Namespace) -> int:
    train(load_config(args.config, args.overrides), console, summary=True)
    return 0


def run_tokenize(args: argparse.Namespace) -> int:
    data_cfg = DataConfig(source=args.sources, tokenizer=args.tokenizer, text_field=args.text_field)
    info = tokenize_corpus(data_cfg, Path(args.out))
    console.print(f"wrote {info['n_tokens']:,} tokens of {info['n_documents']:,} documents to {args.out} "
                  f"({info['dtype']}, vocab {info['vocab_size']})")
    return 0


def run_plot_metrics(args: argparse.Namespace) -> int:
    console.print(f"wrote {plot_metrics(args.run_dir, args.out)}")
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    data = DataConfig(source=args.data, tokenizer=args.tokenizer) if args.data else None
    diagnose(args.checkpoint, args.out, data=data, compare=args.compare, trace_path=args.trace,
             seq_len=args.seq_len, max_tokens=args.tokens, attention=args.attention, console=console)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    stored = _open(Path(args.checkpoint))
    model = stored.model
    tokenizer = load_tokenizer(DataConfig(tokenizer=args.tokenizer) if args.tokenizer else stored.data or DataConfig())
    check_vocabulary(model.cfg.vocab_size, tokenizer)
    if not args.prompt:
        raise UsageError("--prompt must not be empty")
    prompt = torch.as_tensor(tokenizer.encode(args.prompt), dtype=torch.long)[None]
    console.print(Text(args.prompt, style="dim"), end="")
    new_ids, shown = [], ""
    for step in stream(model, prompt, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                       top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop_tokens=args.stop,
                       seed=args.seed, compile=args.compile):
        new_ids.append(int(step[0]))
        text = tokenizer.decode(new_ids)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            console.out(text[len(shown):], end="", highlight=False)
            shown = text
    console.out(tokenizer.decode(new_ids)[len(shown):], highlight=False)
    tokens = torch.cat([prompt, torch.tensor([new_ids], dtype=torch.long)], 1)
    if args.trace:
        header = {"source": f"generate {stored.path}", "tokenizer": tokenizer.name, "model": vars(model.cfg)}
        console.print(f"wrote {save_trace(trace_sequences(model, tokens, header), args.trace)}")
    return 0


def _bench_model(args: argparse.Namespace) -> MoEDiffTransformer:
    """Random weights at a config's shapes (seeded), or a checkpoint's weights."""
    dtype, device = DTYPES[args.dtype], torch.device(args.device)
    source = Path(args.source)
    if source.suffix in (".yaml", ".yml"):
        cfg = load_config(source, args.overrides).model
        torch.manual_seed(args.seed)
        with device:  # initialised where it runs: a multi-GB model need not pass through host memory
            return MoEDiffTransformer(cfg).to(dtype=dtype)
    if args.overrides:
        raise UsageError("dotlist overrides apply to a YAML config, not to a checkpoint")
    return _open(source, dtype=dtype).model.to(device)


def run_bench(args: argparse.Namespace) -> int:
    model = _bench_model(args)
    systems = args.systems or [s for s in bench.SYSTEMS if s != "transformers" or model.cfg.attention == "standard"]
    settings = bench.BenchSettings(args.batch, args.prompt, args.new_tokens, args.routing, args.compile,
                                   args.repeats, systems, args.seed)
    settings.check(model)
    runs = len(systems) * len(args.batch) * len(args.prompt) * (1 + args.repeats)
    with Progress(*Progress.get_default_columns(), TextColumn("{task.fields[label]}"), console=console) as progress:
        task = progress.add_task("bench", total=runs, label="copy bandwidth")
        done = []

        def advance(label: str) -> None:
            progress.update(task, completed=len(done), label=label)
            done.append(label)

        results = bench.run_bench(model, settings, advance)
        progress.update(task, completed=runs, label="done")
    console.out(bench_report.markdown(results), highlight=False)
    console.print("wrote " + ", ".join(str(path) for path in bench_report.write(results, Path(args.out))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-diff", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    info = commands.add_parser("info", help="parameters, FLOPs and KV-cache size of a config")
    info.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    info.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. model.n_layers=4")
    info.add_argument("--seq-len", type=int, default=None,
                      help="sequence length for FLOPs and cache size (default min(max_seq_len, 4096))")
    info.add_argument("--kv-dtype", choices=DTYPES, default="bfloat16", help="KV-cache element type")
    info.add_argument("--forward", action="store_true",
                      help="also build the model and run one forward+backward pass on random tokens")
    info.set_defaults(run=run_info)

    train_cmd = commands.add_parser("train", help="train a model (also: python -m moe_diff.train under torchrun)")
    train_cmd.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    train_cmd.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. train.max_steps=100")
    train_cmd.set_defaults(run=run_train)

    tokenize = commands.add_parser("tokenize", help="pre-tokenise text into a binary token file")
    tokenize.add_argument("sources", nargs="+", help="text files, directories, globs or .jsonl files, or 'builtin'")
    tokenize.add_argument("--out", required=True, help="output .bin file (a .json sidecar is written beside it)")
    tokenize.add_argument("--tokenizer", default="byte", help="'byte' or a tokenizer.json path")
    tokenize.add_argument("--text-field", default="text", help="field holding the text in .jsonl records")
    tokenize.set_defaults(run=run_tokenize)

    plot = commands.add_parser("plot-metrics", help="draw loss and throughput curves of a run to PNG")
    plot.add_argument("run_dir", help="a train.out_dir holding metrics.jsonl")
    plot.add_argument("--out", default=None, help="PNG path (default RUN_DIR/metrics.png)")
    plot.set_defaults(run=run_plot_metrics)

    gen = commands.add_parser("generate", help="sample a continuation of a prompt from a checkpoint")
    gen.add_argument("checkpoint", help="a checkpoint, a training checkpoint step-N or a run directory")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=200)
    gen.add_argument("--temperature", type=float, default=0.8, help="0 is greedy")
    gen.add_argument("--top-k", type=int, default=None)
    gen.add_argument("--top-p", type=float, default=None)
    gen.add_argument("--repetition-penalty", type=float, default=1.0)
    gen.add_argument("--stop", type=int, nargs="*", default=[], help="token ids that end the generation")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--tokenizer", default=None, help="'byte' or a tokenizer.json (default: the run's)")
    gen.add_argument("--compile", action="store_true", help="compile the decode step (pays off for long outputs)")
    gen.add_argument("--trace", default=None, help="write the routing of prompt and continuation to this file")
    gen.set_defaults(run=run_generate)

    diag = commands.add_parser("diagnose", help="where tokens go: routing statistics, plots and an HTML report")
    diag.add_argument("checkpoint", help="a checkpoint, a training checkpoint step-N, a run directory or a trace file")
    diag.add_argument("--out", required=True, help="directory for stats.json, the plots and report.html")
    diag.add_argument("--data", nargs="+", default=None,
                      help="text sources to route (default: the run's data, else the built-in corpus); "
                           "their validation split is used")
    diag.add_argument("--tokenizer", default="byte", help="tokenizer for --data: 'byte' or a tokenizer.json")
    diag.add_argument("--compare", default=None, help="another checkpoint or trace, run on the same tokens")
    diag.add_argument("--trace", default=None, help="also write the routing trace to this .safetensors file")
    diag.add_argument("--attention", action="store_true",
                      help="also lambda, attention maps, noise mass, entropy and activation outliers")
    diag.add_argument("--tokens", type=int, default=16384, help="how many validation tokens to route")
    diag.add_argument("--seq-len", type=int, default=256, help="sequence length of the routed windows")
    diag.set_defaults(run=run_diagnose)

    bench_cmd = commands.add_parser("bench", help="time prefill and decode beside transformers' Mixtral and a dense "
                                    "model of the same active size")
    bench_cmd.add_argument("source", help="a YAML config (random weights at its shapes) or a checkpoint/run directory")
    bench_cmd.add_argument("overrides", nargs="*", help="dotlist overrides for a config, e.g. model.n_layers=2")
    bench_cmd.add_argument("--out", required=True, help="output path without suffix: writes .json, .md and .png")
    bench_cmd.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64], help="batch sizes")
    bench_cmd.add_argument("--prompt", type=int, nargs="+", default=[32, 512], help="prompt lengths in tokens")
    bench_cmd.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    bench_cmd.add_argument("--routing", choices=ROUTING_MODES, default="own",
                           help="the model's own routing, or forced uniform or Zipf-skewed expert choices")
    bench_cmd.add_argument("--systems", nargs="+", choices=bench.SYSTEMS, default=None,
                           help="what to time (default: all that apply; transformers needs standard attention)")
    bench_cmd.add_argument("--compile", action="store_true", help="compile this project's decode steps")
    bench_cmd.add_argument("--repeats", type=int, default=3,
                           help="timed generations per system and shape, after its warm-up")
    bench_cmd.add_argument("--dtype", choices=DTYPES, default="float32")
    bench_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    bench_cmd.add_argument("--seed", type=int, default=0, help="seeds the random weights and prompts")
    bench_cmd.set_defaults(run=run_bench)

    convert = commands.add_parser("convert", help="Mixtral directory <-> moe-diff checkpoint")
    convert.add_argument("src", help="a Hugging Face Mixtral directory or a moe-diff checkpoint")
    convert.add_argument("dst", help="new directory to write (the other format)")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    convert.set_defaults(run=run_convert)

    export = commands.add_parser("export", help="a run or training checkpoint as one checkpoint (or Mixtral)")
    export.add_argument("source", help="a run directory (its newest valid checkpoint), a step-N or a checkpoint")
    export.add_argument("dst", help="new directory to write")
    export.add_argument("--format", choices=("moe-diff", "mixtral"), default="moe-diff",
                        help="this project's single-file schema, or Hugging Face Mixtral (standard attention)")
    export.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    export.set_defaults(run=run_export)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("seq_len", "tokens", "max_new_tokens", "new_tokens"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            errors.print(f"[red]error:[/] --{flag.replace('_', '-')} must be a positive integer")
            return 2
    return run_reporting_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
