"""Shared figure plumbing: an Agg figure without pyplot (no global backend state), saved as PNG."""
from __future__ import annotations

import io
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from trainable import atomic

DPI = 110
# tab10 without its grey, so grey can mean "the other trials"
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#bcbd22", "#17becf"]
OTHER = "#b0b0b0"


def figure(width: float = 9.0, height: float = 5.0, **subplots) -> tuple[Figure, object]:
    """(figure, axes) like plt.subplots, on an Agg canvas."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic.write_bytes(path, buf.getvalue())
    return path


def legend_below(fig: Figure, *axes, fontsize: int = 8) -> None:
    """One legend for the figure, under its axes: inside an axes a legend can cover bar labels."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(label, handle)
    fig.legend(list(seen.values()), list(seen), loc="outside lower center", ncols=min(3, len(seen)),
               fontsize=fontsize)
