"""matplotlib for the PNGs every job writes: a non-interactive backend, heatmaps, and saving a figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported when a plot is first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(axis: Any, values: Any, title: str, xlabel: str, ylabel: str, vmin: float | None = None,
            vmax: float | None = None) -> None:
    image = axis.imshow(values, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axis.figure.colorbar(image, ax=axis)


def save(figure: Any, path: Path, dpi: int = 90) -> Path:
    """Write the figure to `path` as PNG and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
