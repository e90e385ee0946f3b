"""A training run's directory (`train.out_dir`): where its files live, and the reader of its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moe_diff.errors import DataError

METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
CHECKPOINTS_DIR = "checkpoints"  # step-N/ training checkpoints
TRACES_DIR = "traces"  # step-N.safetensors routing traces (train.trace_every)
TENSORBOARD_DIR = "tensorboard"  # event files, where tensorboard is installed
PLOT_FILE = "metrics.png"  # moe-diff plot-metrics
RUN_FILES = (CHECKPOINTS_DIR, METRICS_FILE, TRACES_DIR, TENSORBOARD_DIR, PLOT_FILE)  # what one run writes
PREVIOUS_DIR = "previous"  # previous/N: the files of an earlier run, moved aside (training/start.py)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order. A last line cut short (the job was killed while writing it,
    so no newline ends it) is left out; any other line that is not a JSON object is a DataError naming it."""
    text = path.read_text()
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise DataError(f"{path}:{number} is not a metrics record ({error.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number} is not a metrics record (a JSON object)")
        records.append(record)
    return records
