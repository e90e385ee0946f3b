"""matplotlib for the PNGs every job writes: a non-interactive backend, heatmaps, whole-number ticks, and saving a
figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

MASKED_COLOUR = "0.7"  # grey: hidden cells, apart from every colour of the sequential and the diverging map


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed), imported when a plot is first drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def integer_ticks(axis: Any, which: str = "x") -> None:
    """Ticks only at whole numbers on the 'x' or 'y' axis, or 'both', for layers, experts and steps."""
    from matplotlib.ticker import MaxNLocator

    for name in ("x", "y") if which == "both" else (which,):
        locator = MaxNLocator("auto", steps=[1, 2, 5, 10], integer=True, min_n_ticks=1)  # a lone layer keeps its tick
        getattr(axis, f"{name}axis").set_major_locator(locator)


def heatmap(axis: Any, values: Any, title: str, xlabel: str, ylabel: str, vmin: float | None = None,
            vmax: float | None = None, hidden: Any = None, centred: bool = False,
            extent: tuple[float, float, float, float] | None = None) -> None:
    """Cells of `values` with a colour bar and whole-number ticks; cells where `hidden` is True are drawn grey, as
    masked; `centred` draws a blue-white-red map with limits symmetric about 0 (white)."""
    from matplotlib import colormaps

    values = np.ma.masked_array(values, mask=False if hidden is None else hidden)
    if centred:
        limit = float(np.abs(values).max()) or 1.0  # an all-zero map still gets a scale
        vmin, vmax = -limit, limit
    colours = colormaps["RdBu_r" if centred else "viridis"].with_extremes(bad=MASKED_COLOUR)
    image = axis.imshow(values, aspect="auto", cmap=colours, vmin=vmin, vmax=vmax, interpolation="nearest",
                        extent=extent)
    axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
    integer_ticks(axis, "both")
    axis.figure.colorbar(image, ax=axis)


def save(figure: Any, path: Path, dpi: int = 90) -> Path:
    """Write the figure to `path` as PNG and free it."""
    figure.tight_layout()
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
