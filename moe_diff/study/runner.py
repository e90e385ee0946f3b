"""Running a study: each planned run trained by the training job (resumed where it stopped, skipped where its
results are stored), measured on the held-out tokens, one after another in this process or N at once in worker
processes (moe_diff.study.worker); then study.json and the report."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from rich.console import Console
from rich.progress import Progress

from moe_diff import costs
from moe_diff.config import Config, section_from_dict, without_kernels
from moe_diff.data import load_corpus, load_tokenizer
from moe_diff.device import environment, resolve_device
from moe_diff.diagnostics.needle import check_needle_lengths
from moe_diff.errors import MoeDiffError, UsageError, literal, teller
from moe_diff.files import write_json
from moe_diff.runs import METRICS_FILE, read_metrics
from moe_diff.study.aggregate import aggregate, scalars
from moe_diff.study.measure import Measures, measure
from moe_diff.study.plan import PlannedRun, baseline_mode, plan_study
from moe_diff.study.report import write_report
from moe_diff.train import train
from moe_diff.training.trainer import progress_bars

RESULT_FILE = "study-run.json"  # in each run directory: its config, measurement settings and results
SPEC_FILE = "study-spec.json"  # in each run directory, for a worker process (moe_diff.study.worker)
LOG_FILE = "study.log"  # a worker's console
PLAN_FILE = "study-plan.json"  # in the study directory: the base config every run derives from
STUDY_FILE = "study.json"
POLL_S = 1.0  # how often the parent looks at its workers


class StudyError(MoeDiffError, RuntimeError):
    """A run of the study failed, or the study directory holds a study of other settings."""


def comparable(config: Any) -> dict[str, Any]:
    """A stored job config as two studies or runs compare it: without the kernels, which do not change what is
    trained (an empty one where nothing was stored)."""
    config = config if isinstance(config, dict) else {}
    return config | {"model": without_kernels(config.get("model", {}))}


def config_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))


def config_from_dict(values: dict[str, Any]) -> Config:
    return Config(**{section: section_from_dict(section, values[section]) for section in values})


def measures_dict(measures: Measures) -> dict[str, Any]:
    """The measurement settings as JSON stores them (lists, not tuples), to compare with stored ones."""
    return json.loads(json.dumps(dataclasses.asdict(measures)))


def stored_result(run: PlannedRun, measures: Measures) -> dict[str, Any] | None:
    """The run's stored results if they are of this config and these measurements (the needle probe at the lengths
    these measurements probe today), else None."""
    path = run.out_dir / RESULT_FILE
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    same = (comparable(result.get("config")) == comparable(config_dict(run.cfg))
            and result.get("measures") == measures_dict(measures)
            and list(result.get("measured", {}).get("needle", {})) == [
                str(length) for length in measures.lengths(run.cfg.model, load_tokenizer(run.cfg.data))])
    return result if same else None


def check_plan(out: Path, cfg: Config, match: str) -> None:
    """Record the study's base config in OUT, or refuse one that differs from the recorded (modes and seeds may be
    added to a study; what they share may not change; the kernels that run it are not part of it)."""
    shared = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention="standard"),
                                 train=dataclasses.replace(cfg.train, seed=0))  # both set per run
    plan = {"config": config_dict(shared), "match": match}
    path = out / PLAN_FILE
    if path.is_file():
        recorded = json.loads(path.read_text())
        ours, theirs = comparable(plan["config"]), comparable(recorded.get("config"))
        if (theirs, recorded.get("match")) != (ours, match):
            fields = [f"{section}.{key}" for section, values in ours.items() for key, value in values.items()
                      if theirs.get(section, {}).get(key) != value]
            differ = ", ".join(fields[:6]) or f"--match ({recorded.get('match')} before)"
            raise StudyError(f"{out} holds a study of other settings ({differ} differ); continue it with the same "
                             "config and overrides, or give a new --out")
    write_json(plan, path)


def train_and_measure(run: PlannedRun, measures: Measures, console: Console,
                      progress: Progress | None = None) -> dict[str, Any] | None:
    """Train the run (continuing from its newest checkpoint), measure its final model and store the results;
    None when a signal stopped the training (the run continues next time)."""
    result = train(run.cfg, console, progress=progress)
    if result.step < run.cfg.train.max_steps:
        return None
    if result.model.cfg != run.cfg.model:  # the trainer resumed a checkpoint of other shapes
        raise StudyError(f"{run.out_dir} holds a run of another model config than this study plans for "
                         f"{run.name}; give a new --out")
    tokenizer = load_tokenizer(run.cfg.data)
    model = result.model.float()
    measured = measure(model, run.cfg, tokenizer, load_corpus(run.cfg.data, tokenizer), measures)
    records = read_metrics(run.out_dir / METRICS_FILE)
    speeds = [record["tokens_per_s"] for record in records if record.get("tokens_per_s")]
    losses = [record["loss"] for record in records if record.get("loss") is not None]
    record = {"mode": run.mode, "seed": run.seed, "name": run.name, "config": config_dict(run.cfg),
              "measures": measures_dict(measures), "environment": environment(next(model.parameters()).device),
              "train": {"steps": result.step, "final_loss": losses[-1] if losses else None,
                        "tokens_per_s": sum(speeds) / len(speeds) if speeds else None},
              "measured": measured}
    write_json(record, run.out_dir / RESULT_FILE)
    return record


def worker_command(run: PlannedRun, measures: Measures) -> list[str]:
    """A worker process's command line, its spec written into the run directory."""
    spec = {"mode": run.mode, "seed": run.seed, "config": config_dict(run.cfg),
            "measures": measures_dict(measures)}
    write_json(spec, run.out_dir / SPEC_FILE)
    return [sys.executable, "-m", "moe_diff.study.worker", str(run.out_dir / SPEC_FILE)]


def worker_environment(slot: int, parallel: int) -> dict[str, str]:
    """One GPU per worker where there are several (of those this process may use); otherwise the CPU's cores
    shared out."""
    env = dict(os.environ)
    gpus = torch.cuda.device_count()
    if gpus > 1:
        visible = env.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus)))).split(",")
        env["CUDA_VISIBLE_DEVICES"] = visible[slot % len(visible)]
    elif gpus == 0:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    return env


def last_step(run: PlannedRun) -> int:
    """The last logged step of a run (0 before its first log)."""
    try:
        records = read_metrics(run.out_dir / METRICS_FILE)
    except (OSError, MoeDiffError):
        return 0
    return max((record.get("step", 0) for record in records), default=0)


def interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run_in_workers(pending: list[PlannedRun], measures: Measures, parallel: int, progress: Progress,
                   study_task: int) -> None:
    """Train and measure `pending` in up to `parallel` worker processes at once, each run's bar following its
    metrics log; a worker that fails stops the study with the end of its log."""
    queue: list[PlannedRun] = list(pending)
    active: dict[int, tuple[PlannedRun, subprocess.Popen, Any, int]] = {}  # slot -> run, process, log, bar
    on_terminate = signal.signal(signal.SIGTERM, interrupt)  # so that the workers are stopped (and save) too
    try:
        while queue or active:
            for slot in [slot for slot in range(parallel) if slot not in active][:len(queue)]:
                run = queue.pop(0)
                run.out_dir.mkdir(parents=True, exist_ok=True)
                log = (run.out_dir / LOG_FILE).open("w")
                process = subprocess.Popen(worker_command(run, measures), stdout=log, stderr=subprocess.STDOUT,
                                           env=worker_environment(slot, parallel))
                task = progress.add_task(run.name, total=run.cfg.train.max_steps, status="")
                active[slot] = (run, process, log, task)
            time.sleep(POLL_S)
            for slot, (run, process, log, task) in list(active.items()):
                progress.update(task, completed=last_step(run))
                if process.poll() is None:
                    continue
                log.close()
                progress.remove_task(task)
                del active[slot]
                if process.returncode != 0 or stored_result(run, measures) is None:
                    tail = (run.out_dir / LOG_FILE).read_text().strip().splitlines()[-1:] or ["(no output)"]
                    raise StudyError(f"run {run.name} failed (exit status {process.returncode}): {tail[0]}; its "
                                     f"log is {run.out_dir / LOG_FILE}")
                progress.advance(study_task)
    finally:
        signal.signal(signal.SIGTERM, on_terminate)
        for _, process, log, _ in active.values():
            process.terminate()  # the trainer saves a checkpoint on SIGTERM
            process.wait()
            log.close()


def curves(run: PlannedRun) -> dict[str, list]:
    """The run's training curves from its metrics log: [step, value] pairs."""
    records = read_metrics(run.out_dir / METRICS_FILE)
    found: dict[str, list] = {"loss": [], "val_loss": [], "lambda": [], "lambda_spread": []}
    for record in records:
        for name in found:
            if record.get(name) is not None:
                found[name].append([record["step"], record[name]])
    return found


def run_study(cfg: Config, modes: Sequence[str], seeds: Sequence[int], out: Path, match: str = "shapes",
              parallel: int = 1, measures: Measures | None = None, console: Console | None = None
              ) -> dict[str, Any] | None:
    """Train and measure every (mode, seed) run not yet done, then write OUT/study.json and the report; returns
    the study's numbers, or None when a signal stopped it (run it again to continue)."""
    console = console or Console()
    measures = measures or Measures()
    if parallel < 1:
        raise UsageError(f"--parallel {parallel}: a positive number of runs at once")
    tokenizer = load_tokenizer(cfg.data)
    check_needle_lengths(list(measures.needle_lengths), cfg.model.max_seq_len, tokenizer)  # before any run trains
    runs, notes = plan_study(cfg, modes, seeds, out, match)
    out.mkdir(parents=True, exist_ok=True)
    check_plan(out, cfg, match)
    tell = teller(console)
    for note in notes:
        tell(note)
    for mode in modes:
        model = next(run.cfg.model for run in runs if run.mode == mode)
        console.print(f"{mode}: {costs.param_counts(model).total:,} parameters, "
                      f"{costs.flops_per_token(model, cfg.train.seq_len).total / 1e6:.1f} MFLOPs per token",
                      highlight=False)
    pending = [run for run in runs if stored_result(run, measures) is None]
    with progress_bars(console) as progress:
        study_task = progress.add_task("study runs", total=len(runs), completed=len(runs) - len(pending),
                                       status=f"{len(runs) - len(pending)} stored")
        try:
            if parallel > 1:
                run_in_workers(pending, measures, parallel, progress, study_task)
            else:
                for run in pending:
                    progress.update(study_task, status=run.name)
                    if train_and_measure(run, measures, console, progress) is None:
                        raise KeyboardInterrupt  # a signal stopped the training, which saved its checkpoint
                    progress.advance(study_task)
        except KeyboardInterrupt:
            console.print("study stopped; the same command continues it (finished runs are kept)")
            return None
    study = summarise(cfg, runs, {run.name: stored_result(run, measures) for run in runs}, modes, seeds, match,
                      notes)
    write_json(study, out / STUDY_FILE)
    images = write_report(study, out)
    console.print(f"wrote {literal(out / STUDY_FILE)}, {literal(out / 'report.html')} and {len(images)} plots",
                  highlight=False)
    return study


def summarise(cfg: Config, runs: list[PlannedRun], results: dict[str, dict[str, Any]], modes: Sequence[str],
              seeds: Sequence[int], match: str, notes: list[str]) -> dict[str, Any]:
    """study.json: the settings, every run (its numbers, measurements and curves) and the aggregates."""
    rows = [{"mode": run.mode, "seed": run.seed, "name": run.name, "run_dir": str(run.out_dir),
             "model": config_dict(run.cfg)["model"], "scalars": scalars(results[run.name]["measured"]),
             "train": results[run.name]["train"], "measured": results[run.name]["measured"], "curves": curves(run)}
            for run in runs]
    baseline = baseline_mode(modes)
    return {"environment": environment(resolve_device(cfg.train.device)),  # where the report was written
            "modes": list(modes), "seeds": list(seeds), "match": match, "notes": notes, "baseline": baseline,
            "config": config_dict(cfg), "measures": results[runs[0].name]["measures"], "runs": rows,
            "aggregate": aggregate(rows, baseline)}

