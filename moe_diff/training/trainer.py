"""The training loop: the trainer built from a config (data, model laid out over the job's ranks, optimizer,
checkpoint to resume), its steps, validation, logging and checkpoints."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from moe_diff import costs
from moe_diff.checkpoint import training as checkpoints
from moe_diff.checkpoint.schema import load_model_config
from moe_diff.config import Config, ConfigError, Kernels
from moe_diff.data import (
    Batch,
    BatchSampler,
    PackedSequences,
    check_vocabulary,
    fixed_batches,
    load_corpus,
    load_tokenizer,
    make_batch,
    split_digest,
    validation_batches,
)
from moe_diff.device import peak_flops, peak_memory, resolve_device
from moe_diff.errors import MoeDiffError, literal, teller
from moe_diff.kernels.precision import compute_dtype
from moe_diff.model import ModelOutput, MoEDiffTransformer
from moe_diff.parallel import runtime
from moe_diff.parallel.apply import (
    checkpoint_activations,
    compile_blocks,
    materialize,
    parallelize,
    shard_fully,
    wrap,
)
from moe_diff.parallel.context_parallel import SequenceLayout, split_sequences
from moe_diff.parallel.gradients import accumulating, clip_grad_norm, sync_gradients
from moe_diff.parallel.pieces import local_tensor
from moe_diff.parallel.tensor_parallel import sharded_logits
from moe_diff.routing.collect import collect_trace
from moe_diff.routing.summary import load_summary, router_entropy
from moe_diff.routing.trace import save_trace
from moe_diff.runs import CHECKPOINTS_DIR, TRACES_DIR
from moe_diff.training.guards import NonFiniteSteps, StopFlag
from moe_diff.training.metrics import MetricsLog
from moe_diff.training.optim import build_optimizer, learning_rate, set_learning_rate
from moe_diff.training.probes import LambdaProbe
from moe_diff.training.start import plan_start

SKIPPED_KEYS = ("skipped", "skipped_steps", "lr")  # what the metrics of a skipped log step keep


class TrainingError(MoeDiffError, RuntimeError):
    """Training cannot go on (for example, too many non-finite losses or gradients in a row)."""


@dataclass
class StepSums:
    """What one step's micro-batches add up on this rank, on the device."""

    totals: torch.Tensor  # [4] loss, aux, load balance, z: means over the micro-batches
    load: torch.Tensor  # [L, E] assignments each expert computed
    entropy: torch.Tensor  # [L] router entropy, mean over the micro-batches (log steps only)
    probe: LambdaProbe  # lambda of the last micro-batch (log steps only)


@dataclass
class RunResult:
    out_dir: Path
    step: int  # last completed optimizer step
    loss: float | None  # training loss of the last logged step (the last step, unless a signal stopped the run)
    val_loss: float | None
    seconds: float
    stop_reason: str  # "finished", "signal" or "max_steps already reached"
    model: MoEDiffTransformer


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast (float32 weights and optimizer) on CUDA by default; plain float32 on CPU."""
    use_bf16 = precision == "bfloat16" or (precision == "auto" and device.type == "cuda")
    if not use_bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def with_stored_model(cfg: Config, checkpoint_dir: Path, console: Console) -> Config:
    """The job config with the checkpoint's model, which wins over the given one, on the given kernels."""
    stored = Kernels.of(cfg.model).on(load_model_config(checkpoint_dir))
    given = vars(cfg.model)
    changed = [f"model.{f.name}={value!r} (given {given[f.name]!r})" for f in dataclasses.fields(stored)
               if f.compare and (value := getattr(stored, f.name)) != given[f.name]]
    if changed:
        console.print(f"[yellow]resuming:[/] the model is the checkpoint's, so it keeps {literal(', '.join(changed))}",
                      soft_wrap=True)
    return dataclasses.replace(cfg, model=stored)


def sequence_layout(cfg: Config, job: runtime.Runtime) -> SequenceLayout | None:
    """With parallel.cp, which positions of every training sequence each rank holds (ConfigError if the length
    does not split)."""
    return SequenceLayout(job.dims.cp, cfg.train.seq_len, cfg.model.sliding_window) if job.dims.cp > 1 else None


def progress_bars(console: Console) -> Progress:
    """Bars as the training job shows them: a name, done/total, the bar, a status line (every task has a `status`
    field) and the time left."""
    return Progress(TextColumn("[bold]{task.description}"), MofNCompleteColumn(), BarColumn(),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(), console=console, transient=False)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.to(compute_dtype(logits.dtype)).flatten(0, 1), targets.flatten())


@torch.no_grad()
def loss_sums(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device, precision: str) -> torch.Tensor:
    """[summed next-token loss, tokens] over the batches (float64, on `device`) in evaluation mode; leaves the model
    in training mode."""
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = batch.to(device)
        with autocast(device, precision):
            out = model(batch.tokens, batch.positions, batch.document_ids)
        count = batch.targets.numel()
        sums += torch.stack([cross_entropy(out.logits, batch.targets).double() * count, sums.new_tensor(count)])
    model.train()
    return sums


def evaluate(model: torch.nn.Module, batches: list[Batch], device: torch.device, precision: str) -> float:
    """Mean next-token loss over every token of the validation batches."""
    total, count = loss_sums(model, batches, device, precision).tolist()
    return total / count


class Trainer:
    """One training run: builds everything from the config, then `run()` steps until done."""

    def __init__(self, cfg: Config, console: Console, job: runtime.Runtime):
        self.runtime = job  # one process, or this rank of a torchrun job
        self.device = job.device(resolve_device(cfg.train.device))
        self.console = console if self.runtime.is_main else Console(quiet=True)  # rank 0 speaks for the job
        console = self.console
        per_rank, remainder = divmod(cfg.train.batch_size, self.runtime.row_readers * cfg.train.grad_accum)
        if remainder or not per_rank:
            raise ConfigError(f"train.batch_size={cfg.train.batch_size} is not allowed: {self.runtime.row_readers} "
                              f"ranks reading different rows x train.grad_accum={cfg.train.grad_accum} micro-batches "
                              "must divide it")
        self.sequence_layout = sequence_layout(cfg, job)  # a length cp cannot split is refused before anything moves
        start = plan_start(cfg.train, console, self.runtime)
        self.run_id, resume_from = start.run_id, start.checkpoint
        if resume_from is not None:
            cfg = with_stored_model(cfg, resume_from, console)
            self.sequence_layout = sequence_layout(cfg, job)  # the checkpoint's window
        self.cfg, t = cfg, cfg.train
        self.out_dir = Path(t.out_dir)
        torch.manual_seed(t.seed)

        self.tokenizer = load_tokenizer(cfg.data)
        corpus = load_corpus(cfg.data, self.tokenizer, tell=teller(console))
        check_vocabulary(cfg.model.vocab_size, self.tokenizer, corpus.vocab_size)
        self.data_split = split_digest(corpus)
        self.train_windows = PackedSequences(corpus.train, t.seq_len, corpus.eot_id)
        val_windows = PackedSequences(corpus.val, t.seq_len, corpus.eot_id, split="validation")
        self.val_batches = fixed_batches(val_windows, t.batch_size, t.eval_batches)
        self.sampler = BatchSampler(len(self.train_windows), t.batch_size, t.seed)
        if t.trace_every:  # the same validation tokens every time, so traces of two steps compare
            self.trace_batches = validation_batches(corpus, t.seq_len, t.eval_batches * t.batch_size * t.seq_len,
                                                    t.batch_size)
            self.trace_names = corpus.val_names

        with torch.device("meta"):  # shapes only: each rank allocates just its shards
            self.model = parallelize(MoEDiffTransformer(cfg.model), self.runtime)
        checkpoint_activations(self.model, t.activation_checkpointing)
        if t.compile:
            compile_blocks(self.model)
        shard_fully(self.model, self.runtime)  # FSDP, still on the meta device
        materialize(self.model, self.runtime, self.device, seed=t.seed if resume_from is None else None)
        self.data_parallel = wrap(self.model, self.runtime)  # the model itself, or DDP
        if self.runtime.distributed:
            held = sum(local_tensor(p).numel() for p in self.model.parameters())
            dims = self.runtime.dims
            hsdp = f", HSDP over {dims.dp_replicate} groups" if dims.hsdp else ""
            context = f" cp={dims.cp}" if dims.cp > 1 else ""
            console.print(f"{dims.world_size} ranks: dp={dims.dp} tp={dims.tp} ep={dims.ep}{context} "
                          f"({cfg.parallel.data_parallel}{hsdp}); rank 0 holds {held / 1e6:.2f}M of the model's "
                          f"{costs.param_counts(cfg.model).total / 1e6:.2f}M parameters")
        self.optimizer = build_optimizer(self.model, t)
        self.step, streak = 0, 0
        if resume_from is not None:
            state = checkpoints.load(resume_from, self.model, self.optimizer, self.runtime)
            self.sampler.load_state_dict(state["sampler"])
            if "data_split" not in state:  # written before checkpoints recorded it, and document names held paths
                console.print(f"[yellow]resuming:[/] {literal(resume_from)} does not record its data's split; "
                              "where data.source names files or folders, the validation documents may differ from "
                              "those it was trained beside", soft_wrap=True)
            elif state["data_split"] != self.data_split:
                console.print(f"[yellow]resuming:[/] the data differs from the data {literal(resume_from)} was "
                              "trained on (other documents, or other validation documents, in data.source): "
                              "validation losses before and after this step do not compare", soft_wrap=True)
            self.step, streak = state["step"], state["nonfinite_streak"]
            console.print(f"resumed from {literal(resume_from)} at step {self.step}")
        self.nonfinite = NonFiniteSteps(streak, self.device)
        self.flops_per_token = 3 * costs.flops_per_token(cfg.model, t.seq_len).total  # forward + backward
        self.peak_flops = peak_flops(self.device)

    def save(self) -> Path:
        """Every rank writes the parts of the model and optimizer state it holds."""
        trainer_state = {checkpoints.RUN_ID: self.run_id, "sampler": self.sampler.state_dict(),
                         "nonfinite_streak": self.nonfinite.streak, "data_split": self.data_split}
        return checkpoints.save(self.out_dir / CHECKPOINTS_DIR, self.step, self.model, self.optimizer, self.runtime,
                                trainer_state, self.cfg, self.cfg.train.keep_checkpoints, self.tokenizer.file_text)

    def write_trace(self) -> Path:
        """OUT_DIR/traces/step-N.safetensors: how the model routes the fixed validation tokens now."""
        header = {"source": f"train step {self.step}", "tokenizer": self.tokenizer.name, "step": self.step,
                  "model": vars(self.cfg.model)}
        batches = [(batch.to(self.device), documents) for batch, documents in self.trace_batches]
        trace = collect_trace(self.model, batches, self.trace_names, header)  # every rank: experts may be sharded
        self.model.train()
        path = self.out_dir / TRACES_DIR / f"step-{self.step}.safetensors"
        return save_trace(trace, path) if self.runtime.is_main else path

    def train_step(self, details: bool) -> dict[str, Any]:
        """Forward and backward over the micro-batches of one global batch, then the optimizer step.

        With `details` (log steps), also the routing summary and, for diff attention, lambda.
        """
        return self.update(self.compute_gradients(details), details)

    def compute_gradients(self, details: bool) -> StepSums:
        """The next global batch's forward and backward, micro-batch by micro-batch, its gradients then made those
        of the whole batch (summed over tensor-parallel parts, averaged over data-parallel ranks) and its sums
        reduced over the job."""
        t = self.cfg.train
        set_learning_rate(self.optimizer, learning_rate(self.step, t))
        global_batch = make_batch(self.train_windows, self.sampler.next_indices())  # the same on every rank
        micro_size = t.batch_size // t.grad_accum  # sequences of a micro-batch, over all data-parallel ranks
        n_layers, n_experts = self.cfg.model.n_layers, self.cfg.model.n_experts
        sums = StepSums(torch.zeros(4, device=self.device), torch.zeros(n_layers, n_experts, device=self.device),
                        torch.zeros(n_layers, dtype=torch.float64, device=self.device), LambdaProbe(self.model))
        for i in range(t.grad_accum):
            micro, _ = self.rank_part(global_batch, i * micro_size, micro_size)  # rows that split: all counted
            last = i == t.grad_accum - 1
            with accumulating(self.data_parallel, self.runtime, last), split_sequences(self.model,
                                                                                       self.sequence_layout):
                with (autocast(self.device, t.precision),
                      sums.probe if details and last else contextlib.nullcontext(),
                      sharded_logits(self.model) as vocab_parallel_loss):  # parallel.vocab_parallel's own columns
                    out = self.data_parallel(micro.tokens, micro.positions, micro.document_ids)
                loss = (vocab_parallel_loss or cross_entropy)(out.logits, micro.targets)
                router = out.router_losses(self.balance_counts(out))
                ((loss + router.weighted) / t.grad_accum).backward()
            sums.totals += torch.stack([loss, router.weighted, router.load_balance, router.z]).detach() / t.grad_accum
            sums.load += torch.stack([routing.counts for routing in out.routings])
            if details:
                sums.entropy += torch.stack([router_entropy(routing.probs) for routing in out.routings]) / t.grad_accum
        self.runtime.reduce(sums.totals, "mean")
        self.runtime.sum_over_data(sums.load)  # the whole batch's expert load, on every rank
        sync_gradients(self.model, self.runtime)
        return sums

    def rank_part(self, batch: Batch, first: int, rows: int) -> tuple[Batch, float]:
        """This rank's share of rows [first, first + rows) of `batch` (the same on every rank), on its device: its
        rows of them and, with parallel.cp, its positions of those; with the share of their loss it counts (rows
        that do not split over the ranks reading different rows are read whole by each, which counts 1/readers)."""
        readers = self.runtime.row_readers
        per_rank, share = (rows // readers, 1.0) if rows % readers == 0 else (rows, 1 / readers)
        start = first + (self.runtime.data_rank * per_rank if share == 1.0 else 0)
        part = batch.slice(start, start + per_rank)
        if self.sequence_layout is not None:
            part = part.map(functools.partial(self.sequence_layout.own_positions, rank=self.runtime.cp_rank))
        return part.to(self.device), share

    def validate(self) -> float:
        """Mean next-token loss over the validation batches, each rank running its share of each micro-batch of them
        as in training."""
        t = self.cfg.train
        micro, sums = t.batch_size // t.grad_accum, torch.zeros(2, dtype=torch.float64, device=self.device)
        with split_sequences(self.model, self.sequence_layout):
            for batch in self.val_batches:
                rows = batch.tokens.shape[0]  # the last may be short
                for first in range(0, rows, micro):
                    part, share = self.rank_part(batch, first, min(micro, rows - first))
                    sums += share * loss_sums(self.data_parallel, [part], self.device, t.precision)
        total, count = self.runtime.sum_over_data(sums).tolist()
        return total / count

    def balance_counts(self, out: ModelOutput) -> torch.Tensor | None:
        """The expert counts [L, E] the load-balancing loss balances: the choices of this micro-batch on every
        data-parallel rank (train.load_balance_over=all_ranks), or None for this rank's own (or no balancing)."""
        if self.cfg.train.load_balance_over != "all_ranks" or not self.cfg.model.router_aux_loss_coef:
            return None
        return self.runtime.sum_over_data(out.choice_counts)

    def update(self, sums: StepSums, details: bool) -> dict[str, Any]:
        """The optimizer step on the gradients compute_gradients() left, clipped, unless the loss or the gradient
        norm is not finite (decided on the device: the fused AdamW skips the update where `found_inf` is set, as it
        does for GradScaler), nothing read back; with `details` (log steps), the step's record."""
        t, model_cfg = self.cfg.train, self.cfg.model
        norm = clip_grad_norm(self.model, self.runtime, t.grad_clip if t.grad_clip > 0 else float("inf"))
        finite = torch.isfinite(sums.totals[:2].sum() + norm)  # the same on every rank: all three are reduced
        self.optimizer.found_inf = (~finite).float()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_expert_biases(sums.load * finite)  # a skipped step moves no bias
        self.nonfinite.count(finite)
        if not details:
            return {}
        loss, aux, load_balance, z_loss = sums.totals.tolist()
        record: dict[str, Any] = {"loss": loss, "aux_loss": aux, "load_balance_loss": load_balance, "z_loss": z_loss,
                                  "grad_norm": norm.item(), "lr": self.optimizer.param_groups[0]["lr"]}
        if model_cfg.capacity_factor is not None:
            assignments = t.batch_size * t.seq_len * model_cfg.top_k * model_cfg.n_layers
            record["dropped_fraction"] = 1 - sums.load.sum().item() / assignments
        if not finite:
            return record | {"skipped": True}
        # the whole step's routing: every micro-batch, every data-parallel rank
        record |= load_summary(sums.load) | {"router_entropy": self.runtime.reduce(sums.entropy, "mean").tolist()}
        if sums.probe.values:
            record["lambda"] = sums.probe.values
        if sums.probe.spreads:
            record["lambda_spread"] = sums.probe.spreads
        return record

    def run(self, progress: Progress | None = None) -> RunResult:
        """Step until train.max_steps or a stop signal, then save. `progress` (see progress_bars) shows the run's
        bar among others (a study's); by default it has its own."""
        t, start = self.cfg.train, time.perf_counter()
        if self.step >= t.max_steps:
            return self._result(None, None, time.perf_counter() - start, "max_steps already reached")
        metrics = MetricsLog(self.out_dir, resume_step=self.step) if self.runtime.is_main else None
        tokens_per_step = t.batch_size * t.seq_len
        logged: dict[str, Any] = {}  # the last log step's record
        val_loss, stop_reason = None, "finished"
        interval_start, interval_steps = time.perf_counter(), 0
        shared = progress is not None and self.runtime.is_main
        bars = contextlib.nullcontext(progress) if shared else progress_bars(self.console)
        with StopFlag(self.runtime, self.device, self.step) as stop, bars as progress:
            task = progress.add_task("step", total=t.max_steps, completed=self.step, status="")
            while self.step < t.max_steps:
                after = self.step + 1
                log_now = after % t.log_every == 0 or after == t.max_steps or bool(t.eval_every and
                                                                                  after % t.eval_every == 0)
                record = self.train_step(details=log_now)
                self.step += 1
                interval_steps += 1
                if log_now:
                    streak, longest, skipped = self.nonfinite.read()
                    record |= self.report_skipped(record, streak, skipped)
                    if record.get("skipped") and metrics:
                        kept = {key: record[key] for key in SKIPPED_KEYS if key in record}
                        metrics.log({"step": self.step, "loss": None} | kept | {"grad_norm": None})  # JSON has no NaN
                    if longest >= t.max_nonfinite_steps:
                        raise TrainingError(f"{longest} non-finite losses or gradients in a row (train."
                                            f"max_nonfinite_steps={t.max_nonfinite_steps}); lower train.lr or check "
                                            f"the data. The last good checkpoint is in {self.out_dir / 'checkpoints'}")
                    if record.get("skipped"):
                        continue
                    logged = record
                if t.eval_every and self.step % t.eval_every == 0:
                    val_loss = self.validate()
                    record |= {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50))}
                if t.trace_every and self.step % t.trace_every == 0:
                    self.write_trace()
                if log_now:
                    elapsed = time.perf_counter() - interval_start
                    tokens_per_s = interval_steps * tokens_per_step / elapsed
                    record |= {"tokens_per_s": tokens_per_s, "peak_memory_bytes": peak_memory(self.device),
                               "mfu": (tokens_per_s * self.flops_per_token / self.peak_flops
                                       if self.peak_flops else None)}
                    if metrics:
                        metrics.log({"step": self.step} | record)
                    progress.update(task, status=f"loss {record['loss']:.3f}  {tokens_per_s:,.0f} tok/s")
                    interval_start, interval_steps = time.perf_counter(), 0
                progress.update(task, completed=self.step)
                if stop.requested(self.step):  # every rank stops at the same step
                    stop_reason = "signal"
                    break
                if t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps:
                    self.save()
            if shared:
                progress.remove_task(task)
        saved = self.save()
        if metrics:
            metrics.close()
        self.console.print(f"saved {literal(saved)} ({stop_reason})")
        return self._result(logged.get("loss"), val_loss, time.perf_counter() - start, stop_reason)

    def report_skipped(self, record: dict[str, Any], streak: int, skipped: int) -> dict[str, Any]:
        """On a log step: say how many steps since the last one were skipped for a non-finite loss or gradient
        norm (`skipped`, `streak` of them in a row now); what the record adds."""
        if not skipped:
            return {}
        this_one = (f"step {self.step}: non-finite loss {record['loss']} or gradient norm {record['grad_norm']}, "
                    "skipped; " if record.get("skipped") else "")
        self.console.print(f"[yellow]{this_one}{skipped} step{'s' * (skipped > 1)} skipped since the last log, "
                           f"{streak} in a row now")
        return {"skipped_steps": skipped}

    def _result(self, loss: float | None, val_loss: float | None, seconds: float, reason: str) -> RunResult:
        return RunResult(self.out_dir, self.step, loss, val_loss, seconds, reason, self.model)
