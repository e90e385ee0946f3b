"""`moe-diff eval`: lm-evaluation-harness tasks on any checkpoint form, in this process and without an export (the
model wrapped as a transformers model around its own modules, with its run's tokenizer); the local next-line
tasks (eval_task.TASKS) are known by name."""

from __future__ import annotations

import difflib
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from moe_diff.checkpoint.open import open_model
from moe_diff.config import AUTO_KERNELS, Kernels
from moe_diff.errors import UsageError
from moe_diff.files import write_json
from moe_diff.hf.eval_task import TASKS, write_task
from moe_diff.hf.export import hf_model
from moe_diff.hf.tokenizer import fast_tokenizer


def lm_eval_modules() -> tuple[Any, Any, Any]:
    """lm_eval's evaluator, HF model class and task manager, or a UsageError saying how to install it."""
    try:
        from lm_eval import evaluator
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as error:
        raise UsageError(f"moe-diff eval needs lm-evaluation-harness: pip install lm_eval ({error})") from None
    return evaluator, HFLM, TaskManager


def check_tasks(tasks: Sequence[str], known: Sequence[str]) -> None:
    """UsageError naming each unknown task with the closest known names."""
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, known, n=4)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; the local tasks are {', '.join(TASKS)}"
            raise UsageError(f"--tasks: lm_eval knows no task {task!r}{hint}")


def evaluate(source: str | Path, tasks: Sequence[str], tokenizer: str | None = None,
             include_path: Sequence[str | Path] = (), limit: int | None = None, num_fewshot: int | None = None,
             batch_size: int = 8, device: str = "cpu", dtype: torch.dtype | None = None,
             tell: Callable[[str], None] | None = None, kernels: Kernels = AUTO_KERNELS) -> dict[str, Any]:
    """lm_eval's results for `tasks` on the model at `source` (any form open_model reads, run on `kernels`), with
    `tokenizer` ('byte' or a tokenizer.json; default: the checkpoint's, StoredModel.tokenizer). Tasks outside the
    local ones come from lm_eval's own registry and `include_path`; their data must be available to `datasets`."""
    if not tasks:
        raise UsageError(f"--tasks: name at least one task (the local ones: {', '.join(TASKS)})")
    if limit is not None and limit < 1:
        raise UsageError(f"--limit must be a positive number of questions per task, not {limit}")
    for path in include_path:
        if not Path(path).is_dir():
            raise UsageError(f"--include-path {path}: no such directory (it holds lm_eval task YAML files)")
    evaluator, HFLM, TaskManager = lm_eval_modules()
    stored = open_model(source, dtype=dtype, tell=tell, kernels=kernels)
    text_tokenizer = stored.tokenizer(tokenizer)
    model = hf_model(stored.model.to(device).eval(), text_tokenizer.eot_id)
    with tempfile.TemporaryDirectory(prefix="moe-diff-eval-") as local:
        if any(task in TASKS for task in tasks):
            write_task(Path(local))
        outside = [task for task in tasks if task not in TASKS]
        manager = TaskManager(include_path=[local, *map(str, include_path)], include_defaults=bool(outside))
        check_tasks(tasks, manager.all_tasks)
        lm = HFLM(pretrained=model, backend="causal", batch_size=batch_size,
                  tokenizer=fast_tokenizer(text_tokenizer, stored.model.cfg.max_seq_len))
        with torch.no_grad():
            results = evaluator.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                                task_manager=manager, log_samples=False)
    results["source"] = str(stored.path)
    return results


def write_results(results: dict[str, Any], out: Path | None) -> str:
    """lm_eval's table of `results`; with `out`, the results also as JSON there."""
    from lm_eval.utils import handle_non_serializable, make_table

    if out is not None:
        write_json(results, out, default=handle_non_serializable)
    return make_table(results)
