"""A training run's directory (`train.out_dir`): where its files live, and the reader of its metrics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"  # one JSON object per logged step
CHECKPOINTS_DIR = "checkpoints"  # step-N/ training checkpoints
TRACES_DIR = "traces"  # step-N.safetensors routing traces (train.trace_every)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file, in order."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
