"""What a training run writes as it goes: one JSON line per logged step in metrics.jsonl, and TensorBoard events."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from moe_diff.runs import METRICS_FILE, TENSORBOARD_DIR, read_metrics


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl, and to TensorBoard if installed."""

    def __init__(self, out_dir: Path, resume_step: int):
        self.path = out_dir / METRICS_FILE
        truncate_after(self.path, resume_step)
        self.file = self.path.open("a")
        self.tensorboard = _tensorboard_writer(out_dir / TENSORBOARD_DIR)

    def log(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.tensorboard is not None:
            for key, value in record.items():
                values = value if isinstance(value, list) else [value]
                for i, item in enumerate(values):
                    if isinstance(item, (int, float)) and key != "step":
                        tag = f"{key}/{i}" if isinstance(value, list) else key
                        self.tensorboard.add_scalar(tag, item, record["step"])

    def close(self) -> None:
        self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def truncate_after(path: Path, step: int) -> None:
    """Drop records past `step` (written after the checkpoint a run resumes from), atomically."""
    if not path.exists():
        return
    records = read_metrics(path)
    kept = [record for record in records if record.get("step", 0) <= step]
    if len(kept) != len(records) or not path.read_text().endswith("\n"):  # a line cut short goes too
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(tmp, path)


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional
        return None
    return SummaryWriter(log_dir=str(directory))
