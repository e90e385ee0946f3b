"""The `moe-diff` command line: parses arguments and calls one function per subcommand."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from moe_diff import study
from moe_diff.checkpoint.convert import FORMATS, convert, export
from moe_diff.checkpoint.open import open_model
from moe_diff.config import ATTENTION_MODES, ATTN_BACKENDS, MOE_BACKENDS, DataConfig, Kernels, load_config
from moe_diff.data import tokenize_corpus
from moe_diff.device import DTYPES
from moe_diff.diagnostics import diagnose
from moe_diff.errors import UsageError, literal, run_reporting_errors, teller
from moe_diff.inference.bench import SYSTEMS, BenchSettings
from moe_diff.inference.bench.command import bench_and_write, bench_model, default_systems
from moe_diff.inference.bench.routing import ROUTING_MODES
from moe_diff.inference.complete import complete
from moe_diff.inference.serve import serve
from moe_diff.info import print_info
from moe_diff.study.measure import Measures
from moe_diff.study.plan import MATCHES
from moe_diff.train import train
from moe_diff.training.plots import plot_metrics

console = Console()
errors = Console(stderr=True)
DESCRIPTION = ("Mixture-of-experts decoders with differential attention: train one from a YAML config, compare the "
               "attention modes over seeds, sample from it, see where its tokens are routed, time and score it, and "
               "move checkpoints to and from transformers and Mixtral. Start with `moe-diff info configs/tiny.yaml` "
               "and `moe-diff train configs/tiny.yaml`; `moe-diff COMMAND --help` describes each command.")


class HelpFormatter(argparse.HelpFormatter):
    """Each flag's help ends with its default, unless it has none (unset, off, empty) or the help gives it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text, default = action.help or "", action.default
        if (not action.option_strings or default is None or default is False or default == []
                or default == argparse.SUPPRESS or "default" in text):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: help with defaults, and an argument it does not know reported with its own usage
    (argparse leaves that to the top-level parser, whose usage does not show the command's flags)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{"formatter_class": HelpFormatter, **kwargs})

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        namespace, extras = super().parse_known_args(args, namespace)
        if extras:
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


tell = teller(errors)  # notes on what a command opened or read, on stderr so that its output stays clean


def dtype_or_none(name: str | None) -> torch.dtype | None:
    return DTYPES[name] if name else None


TOKENIZER_HELP = ("'byte' or a tokenizer.json (default: the checkpoint's own tokenizer.json, else its run's "
                  "data.tokenizer)")


def add_model_flags(command: argparse.ArgumentParser) -> None:
    """--tokenizer and the kernels, for a command that runs a stored model."""
    command.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    command.add_argument("--attn-backend", choices=ATTN_BACKENDS, default="auto",
                         help="the attention kernel to run the model on, whatever kernel trained it")
    command.add_argument("--moe-backend", choices=MOE_BACKENDS, default="auto",
                         help="the experts' kernel to run the model on, whatever kernel trained it")


def kernels(args: argparse.Namespace) -> Kernels:
    return Kernels(args.attn_backend, args.moe_backend)


def run_info(args: argparse.Namespace) -> int:
    print_info(args.config, args.overrides, args.seq_len, args.kv_dtype, args.forward, console)
    return 0


def run_convert(args: argparse.Namespace) -> int:
    console.print(literal(convert(Path(args.src), Path(args.dst), dtype_or_none(args.dtype))))
    return 0


def run_export(args: argparse.Namespace) -> int:
    console.print(literal(export(Path(args.source), Path(args.dst), args.format, dtype_or_none(args.dtype), tell,
                                 args.tokenizer)))
    return 0


def run_train(args: argparse.Namespace) -> int:
    train(load_config(args.config, args.overrides), console, summary=True)
    return 0


def run_study(args: argparse.Namespace) -> int:
    measures = Measures(args.tokens, args.needle_trials, tuple(args.needle_lengths))
    for item in args.overrides:
        if item.split("=")[0] in ("model.attention", "train.seed"):
            tell(f"ignoring {item}: a study sets model.attention and train.seed per run (--modes, --seeds)")
    numbers = study.run_study(load_config(args.config, args.overrides), args.modes, args.seeds, Path(args.out),
                              args.match, args.parallel, measures, console)
    return 0 if numbers is not None else 1


def run_tokenize(args: argparse.Namespace) -> int:
    data_cfg = DataConfig(source=args.sources, tokenizer=args.tokenizer, text_field=args.text_field)
    info = tokenize_corpus(data_cfg, Path(args.out), tell=tell)
    console.print(f"wrote {info['n_tokens']:,} tokens of {info['n_documents']:,} documents to {literal(args.out)} "
                  f"({info['dtype']}, vocab {info['vocab_size']})")
    return 0


def run_plot_metrics(args: argparse.Namespace) -> int:
    console.print(f"wrote {literal(plot_metrics(args.run_dir, args.out))}")
    return 0


def run_diagnose(args: argparse.Namespace) -> int:
    if args.needle_lengths and not args.attention:
        raise UsageError("--needle-lengths sets the needle probe of --attention: add --attention")
    data = DataConfig(source=args.data) if args.data else None
    diagnose(args.checkpoint, args.out, data=data, tokenizer=args.tokenizer, compare=args.compare,
             trace_path=args.trace, seq_len=args.seq_len, max_tokens=args.tokens, attention=args.attention,
             console=console, kernels=kernels(args), needle_lengths=args.needle_lengths)
    return 0


def run_generate(args: argparse.Namespace) -> int:
    stored = open_model(args.checkpoint, tell=tell, kernels=kernels(args))
    complete(stored, args.prompt, console, tokenizer=args.tokenizer,
             trace=Path(args.trace) if args.trace else None, max_new_tokens=args.max_new_tokens,
             temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
             repetition_penalty=args.repetition_penalty, stop_tokens=args.stop, seed=args.seed, compile=args.compile)
    return 0


def run_serve(args: argparse.Namespace) -> int:
    export_dir = Path(args.export_dir) if args.export_dir else None
    return serve(Path(args.source), args.host, args.port, args.api_key, export_dir, args.vllm_args, tell)


def run_bench(args: argparse.Namespace) -> int:
    model = bench_model(Path(args.source), args.overrides, DTYPES[args.dtype], torch.device(args.device), args.seed,
                        tell)
    settings = BenchSettings(args.batch, args.prompt, args.new_tokens, args.routing, args.compile, args.repeats,
                             args.systems or default_systems(model), args.seed)
    bench_and_write(model, settings, Path(args.out), console)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    try:
        from moe_diff.inference.evaluate import evaluate, write_results
    except ImportError as error:
        raise UsageError(f"moe-diff eval needs transformers: pip install 'moe-diff[hf]' ({error})") from None
    results = evaluate(args.checkpoint, args.tasks, tokenizer=args.tokenizer, include_path=args.include_path,
                       limit=args.limit, num_fewshot=args.num_fewshot, batch_size=args.batch_size,
                       device=args.device, dtype=dtype_or_none(args.dtype), tell=tell, kernels=kernels(args))
    console.print(literal(write_results(results, Path(args.out) if args.out else None)), highlight=False)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-diff", description=DESCRIPTION, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

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

    study_cmd = commands.add_parser("study", help="train matched runs per attention mode and seed, measure each on the "
                                    "same held-out tokens, and report every difference with its spread over seeds")
    study_cmd.add_argument("config", help="YAML config file, e.g. configs/tiny.yaml")
    study_cmd.add_argument("overrides", nargs="*", help="dotlist overrides for every run, e.g. train.max_steps=100")
    study_cmd.add_argument("--out", required=True, help="study directory: runs/MODE-seedN, study.json, report.html")
    study_cmd.add_argument("--modes", nargs="+", choices=ATTENTION_MODES, default=["standard", "diff", "diff_v2"],
                           help="attention modes to train, each with every seed")
    study_cmd.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                           help="each fixes the data order and the shared initial parameters of its runs")
    study_cmd.add_argument("--match", choices=MATCHES, default="shapes",
                           help="shapes: the config's for every mode; params: the larger modes' model.ffn_dim changed "
                           "so that total parameters are within 1%% of the smallest mode's")
    study_cmd.add_argument("--parallel", type=int, default=1, help="runs at once, in worker processes (one GPU each "
                           "where there are several)")
    study_cmd.add_argument("--tokens", type=int, default=Measures.tokens, help="held-out tokens measured per run")
    study_cmd.add_argument("--needle-trials", type=int, default=Measures.needle_trials,
                           help="needle haystacks per context length and depth")
    study_cmd.add_argument("--needle-lengths", type=int, nargs="*", default=[],
                           help="needle context lengths in tokens (default: half the window, the window, twice it "
                           "and max_seq_len, those too short for a haystack left out)")
    study_cmd.set_defaults(run=run_study)

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
    gen.add_argument("--prompt", required=True, help="the text to continue (printed dimmed before the continuation)")
    gen.add_argument("--max-new-tokens", type=int, default=200, help="how many tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 is greedy")
    gen.add_argument("--top-k", type=int, default=None,
                     help="sample from the k most likely tokens only (default: from all)")
    gen.add_argument("--top-p", type=float, default=None, help="sample from the fewest most likely tokens whose "
                     "probabilities add up to p, in (0, 1] (default: from all)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0,
                     help="shrink the logits of tokens already in the text by this factor (CTRL's); 1 is off")
    gen.add_argument("--stop", type=int, nargs="*", default=[], help="token ids that end the generation")
    gen.add_argument("--seed", type=int, default=0, help="seeds the sampling: the same seed gives the same text")
    add_model_flags(gen)
    gen.add_argument("--compile", action="store_true", help="compile the decode step (pays off for long outputs)")
    gen.add_argument("--trace", default=None, help="write the routing of prompt and continuation to this file")
    gen.set_defaults(run=run_generate)

    diag = commands.add_parser("diagnose", help="where tokens go: routing statistics, plots and an HTML report")
    diag.add_argument("checkpoint", help="a checkpoint, a training checkpoint step-N, a run directory or a trace file")
    diag.add_argument("--out", required=True, help="directory for stats.json, the plots and report.html")
    diag.add_argument("--data", nargs="+", default=None,
                      help="text sources to route (default: the run's data, else the built-in corpus); "
                           "their validation split is used")
    add_model_flags(diag)
    diag.add_argument("--compare", default=None, help="another checkpoint or trace, run on the same tokens")
    diag.add_argument("--trace", default=None, help="also write the routing trace to this .safetensors file")
    diag.add_argument("--attention", action="store_true",
                      help="also lambda, attention maps, noise mass, entropy and activation outliers")
    diag.add_argument("--tokens", type=int, default=16384, help="how many validation tokens to route")
    diag.add_argument("--seq-len", type=int, default=256, help="sequence length of the routed windows")
    diag.add_argument("--needle-lengths", type=int, nargs="+", default=None,
                      help="with --attention: the needle probe's context lengths in tokens (default 1024, at most "
                           "the model's max_seq_len; each at least two lines around the needle)")
    diag.set_defaults(run=run_diagnose)

    serve_cmd = commands.add_parser("serve", help="serve a run, checkpoint or export through vLLM's OpenAI-compatible "
                                    "server (every attention mode; needs vLLM, see docs/serving.md)",
                                    usage="moe-diff serve SOURCE [options] [-- vLLM server arguments]",
                                    epilog="Arguments after -- go to vLLM's server as they are, e.g. -- "
                                    "--max-model-len 4096 --dtype bfloat16 --tensor-parallel-size 2.")
    serve_cmd.add_argument("source", help="a run directory, a step-N, a checkpoint or an `export --format hf` "
                           "directory (the others are exported first)")
    serve_cmd.add_argument("--host", default="127.0.0.1",
                           help="the interface to listen on; 0.0.0.0 for every one, which vLLM itself would pick")
    serve_cmd.add_argument("--port", type=int, default=8000, help="the port to listen on")
    serve_cmd.add_argument("--api-key", default=None, help="requests must carry it (Authorization: Bearer KEY); "
                           "vLLM also reads it from VLLM_API_KEY, which keeps it off the command line")
    serve_cmd.add_argument("--export-dir", default=None,
                           help="where to write the export a source needs (default: a temporary directory)")
    serve_cmd.set_defaults(run=run_serve)

    bench_cmd = commands.add_parser("bench", help="time prefill and decode beside transformers' Mixtral and a dense "
                                    "model of the same active size")
    bench_cmd.add_argument("source", help="a YAML config (random weights at its shapes) or a checkpoint/run directory")
    bench_cmd.add_argument("overrides", nargs="*", help="dotlist overrides for a config, e.g. model.n_layers=2 (a "
                           "checkpoint takes model.attn_backend and model.moe_backend)")
    bench_cmd.add_argument("--out", required=True, help="output path without suffix: writes .json, .md and .png")
    bench_cmd.add_argument("--batch", type=int, nargs="+", default=[1, 4, 16, 64], help="batch sizes")
    bench_cmd.add_argument("--prompt", type=int, nargs="+", default=[32, 512], help="prompt lengths in tokens")
    bench_cmd.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    bench_cmd.add_argument("--routing", choices=ROUTING_MODES, default="own",
                           help="the model's own routing, or forced uniform or Zipf-skewed expert choices")
    bench_cmd.add_argument("--systems", nargs="+", choices=SYSTEMS, default=None,
                           help="what to time (default: moe-diff, dense and, for standard attention, transformers; "
                           "vllm when named, in an environment with vLLM, see docs/serving.md)")
    bench_cmd.add_argument("--compile", action="store_true",
                           help="time moe-diff with compiled decode steps beside its eager run, the dense model's "
                           "compiled, and vLLM in its compiled mode")
    bench_cmd.add_argument("--repeats", type=int, default=3,
                           help="timed generations per system and shape, taken in turns with the other systems")
    bench_cmd.add_argument("--dtype", choices=DTYPES, default="float32", help="weights and activations")
    bench_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                           help="where to run: cpu, cuda or cuda:N")
    bench_cmd.add_argument("--seed", type=int, default=0, help="seeds the random weights and prompts")
    bench_cmd.set_defaults(run=run_bench)

    eval_cmd = commands.add_parser("eval", help="score a checkpoint on lm-evaluation-harness tasks (the local "
                                   "next-line tasks, or any task whose data is available)")
    eval_cmd.add_argument("checkpoint", help="a run directory, a step-N, a checkpoint or an exported directory")
    eval_cmd.add_argument("--tasks", nargs="+", required=True,
                          help="lm_eval task names, e.g. stdlib_next_line stdlib_next_line_gen (local, no "
                          "download) or hellaswag")
    eval_cmd.add_argument("--out", default=None, help="also write lm_eval's results to this JSON file")
    eval_cmd.add_argument("--limit", type=int, default=None, help="at most this many questions per task")
    eval_cmd.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (default: the task's)")
    eval_cmd.add_argument("--include-path", nargs="*", default=[], help="directories of your own task YAMLs")
    add_model_flags(eval_cmd)
    eval_cmd.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    eval_cmd.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    eval_cmd.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                          help="where to run: cpu, cuda or cuda:N")
    eval_cmd.set_defaults(run=run_eval)

    convert = commands.add_parser("convert", help="Mixtral directory <-> moe-diff checkpoint (and an exported "
                                  "transformers directory -> moe-diff checkpoint)")
    convert.add_argument("src", help="a Hugging Face Mixtral directory, an `export --format hf` directory or a "
                         "moe-diff checkpoint")
    convert.add_argument("dst", help="new directory to write (the other format)")
    convert.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    convert.set_defaults(run=run_convert)

    export = commands.add_parser("export", help="a run or training checkpoint as one checkpoint, a transformers "
                                 "directory or Mixtral")
    export.add_argument("source", help="a run directory (its newest valid checkpoint), a step-N or a checkpoint")
    export.add_argument("dst", help="new directory to write")
    export.add_argument("--format", choices=FORMATS, default="moe-diff",
                        help="this project's single-file schema; hf: a transformers directory (every mode; "
                        "AutoModelForCausalLM after `import moe_diff`, or with trust_remote_code=True); or "
                        "Hugging Face Mixtral (standard attention)")
    export.add_argument("--tokenizer", default=None, help=f"--format moe-diff or hf: {TOKENIZER_HELP}")
    export.add_argument("--dtype", choices=DTYPES, default=None, help="cast weights (default: keep)")
    export.set_defaults(run=run_export)
    return parser


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    """The command's arguments; those after `--` (serve's, for vLLM's server) as `vllm_args`."""
    argv = list(argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    parser = build_parser()
    args = parser.parse_args(argv[:cut])
    if cut < len(argv) and args.command != "serve":
        parser.error(f"arguments after -- are for moe-diff serve, not moe-diff {args.command}")
    args.vllm_args = argv[cut + 1:]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    for flag in ("seq_len", "tokens", "max_new_tokens", "new_tokens", "limit", "batch_size", "needle_trials"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            errors.print(f"[red]error:[/] --{flag.replace('_', '-')} must be a positive integer")
            return 2
    return run_reporting_errors(lambda: args.run(args))


if __name__ == "__main__":
    sys.exit(main())
