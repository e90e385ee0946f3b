"""PNG plots of a training run's metrics.jsonl: loss curves and throughput."""

from __future__ import annotations

from pathlib import Path

from moe_diff.errors import UsageError
from moe_diff.plotting import integer_ticks, pyplot, save
from moe_diff.runs import METRICS_FILE, PLOT_FILE, read_metrics


def plot_metrics(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw training and validation loss, and tokens/s, against step; return the PNG path."""
    plt = pyplot()
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise UsageError(f"{run_dir} has no metrics.jsonl (is it a train.out_dir?)")
    records = [r for r in read_metrics(path) if r.get("loss") is not None]
    if not records:
        raise UsageError(f"{path} holds no logged steps yet")
    out = Path(out) if out else run_dir / PLOT_FILE
    figure, (loss_axis, speed_axis) = plt.subplots(1, 2, figsize=(11, 4))
    loss_axis.plot([r["step"] for r in records], [r["loss"] for r in records], label="train")
    val = [r for r in records if r.get("val_loss") is not None]
    if val:
        loss_axis.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    loss_axis.set(xlabel="step", ylabel="loss (nats/token)", title="Loss")
    loss_axis.legend()
    speed = [r for r in records if r.get("tokens_per_s")]
    speed_axis.plot([r["step"] for r in speed], [r["tokens_per_s"] for r in speed])
    speed_axis.set(xlabel="step", ylabel="tokens/s", title="Throughput")
    integer_ticks(loss_axis)
    integer_ticks(speed_axis)
    return save(figure, out, dpi=100)
