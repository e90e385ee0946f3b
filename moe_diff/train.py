"""The training job as users run it: `moe-diff train CONFIG [overrides]`, or `python -m moe_diff.train` (what torchrun
launches): train, then show a sampled continuation of a validation prompt and how the final model routes it."""

from __future__ import annotations

import sys

import torch
from rich import box
from rich.console import Console
from rich.panel import Panel
from rich.progress import Progress
from rich.table import Table
from rich.text import Text

from moe_diff.config import Config, load_config
from moe_diff.data import Batch
from moe_diff.errors import literal, run_reporting_errors
from moe_diff.inference.generation import generate, position_limit
from moe_diff.parallel.context_parallel import split_sequences
from moe_diff.routing.summary import load_summary, router_entropy
from moe_diff.runs import METRICS_FILE
from moe_diff.training.job import training_job
from moe_diff.training.trainer import RunResult, Trainer

SAMPLE_PROMPT_TOKENS = 64


def train(cfg: Config, console: Console | None = None, summary: bool = False,
          progress: Progress | None = None) -> RunResult:
    """Train (or continue training) as the config says; checkpoints and metrics go to train.out_dir. With
    `summary`, every rank then samples and routes together (the model may be split over them); rank 0 prints.
    `progress` shows the run's bar among others (Trainer.run)."""
    console = console or Console()
    with training_job(cfg, console) as trainer:
        result = trainer.run(progress)
        if summary:
            print_summary(trainer, result)
    return result


def print_summary(trainer: Trainer, result: RunResult) -> None:
    """A sampled continuation of a validation prompt, and how the last model routes it."""
    # eager: blocks compiled for training (train.compile) would recompile for generation's shapes; a stance set
    # here, not as a decorator, imports dynamo only when a run ends (2 s a process)
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        _print_summary(trainer, result)


def _print_summary(trainer: Trainer, result: RunResult) -> None:
    t, model, console = trainer.cfg.train, trainer.model, trainer.console
    batch = trainer.val_batches[0].to(trainer.device)
    model.eval()
    prompt = batch.tokens[:1, : min(SAMPLE_PROMPT_TOKENS, t.seq_len)]
    limit = position_limit(model.cfg)  # a model without a window takes max_seq_len positions at most
    new_tokens = t.sample_tokens if limit is None else min(t.sample_tokens, limit - prompt.shape[1])
    if new_tokens > 0:
        sample = generate(model, prompt, new_tokens, temperature=0.8, top_k=50, seed=t.seed)
        console.print(Panel(Text(trainer.tokenizer.decode(prompt[0].tolist()), style="dim")
                            + Text(trainer.tokenizer.decode(sample[0, prompt.shape[1]:].tolist())),
                            title=f"sample after step {result.step} (prompt dimmed)"))
    summary = routing_summary(trainer, trainer.val_batches[0])
    table = Table(title=f"Routing of {batch.tokens.numel():,} validation tokens: % of assignments per expert, "
                        "max/mean load, dead experts, router entropy / ln E", box=box.SIMPLE_HEAD)
    for column in ["layer", *(f"e{e}" for e in range(trainer.cfg.model.n_experts)), "max/mean", "dead", "entropy"]:
        table.add_column(column, justify="right", no_wrap=True)
    for layer, shares in enumerate(summary["expert_share"]):
        table.add_row(str(layer), *(f"{100 * s:.0f}" for s in shares), f"{summary['load_imbalance'][layer]:.2f}",
                      str(summary["dead_experts"][layer]), f"{summary['router_entropy'][layer]:.2f}")
    console.print(table)
    val = f", validation loss {result.val_loss:.3f}" if result.val_loss is not None else ""
    loss = f"{result.loss:.3f}" if result.loss is not None else "n/a"
    console.print(f"step {result.step}: training loss {loss}{val}; {result.seconds:.0f} s; metrics in "
                  f"{literal(result.out_dir / METRICS_FILE)}")
    model.train()


def routing_summary(trainer: Trainer, batch: Batch) -> dict[str, list]:
    """How the model routes `batch`, every rank routing its share of it as validation does (so that no rank holds a
    whole long sequence under parallel.cp), the counts and entropies then taken over the job."""
    job = trainer.runtime
    part, share = trainer.rank_part(batch, 0, batch.tokens.shape[0])
    with split_sequences(trainer.model, trainer.sequence_layout):
        routings = trainer.model(part.tokens, part.positions, part.document_ids).routings
    counts = job.sum_over_data(share * torch.stack([routing.counts for routing in routings]))
    entropy = job.sum_over_data(torch.stack([router_entropy(routing.probs) for routing in routings])) / job.data_ranks
    return load_summary(counts) | {"router_entropy": entropy.tolist()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        print("usage: python -m moe_diff.train CONFIG [section.key=value ...]", file=sys.stderr)
        return 2

    def job() -> int:
        train(load_config(argv[0], argv[1:]), summary=True)
        return 0

    return run_reporting_errors(job)


if __name__ == "__main__":
    sys.exit(main())
