"""Shared figure plumbing: Agg figures (no display, no pyplot state), PNG + SVG output, colours.

Figures are :class:`matplotlib.figure.Figure` objects with an Agg canvas attached, so
rendering never touches a display or pyplot's global figure list (nothing to close, no leak,
whatever backend the caller's pyplot uses): the Agg backend without a global
``matplotlib.use`` switch that would change an interactive program's backend.
"""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

log = logging.getLogger(__name__)

DPI = 130
#: Colours per objective, and for measured points.
OBJECTIVE_COLORS = {"plain": "#1f77b4", "fisher": "#d62728"}
BASELINE_COLOR = "#555555"
KIND_CMAP = "tab10"


def new_figure(width: float, height: float) -> Figure:
    """A figure of ``width`` x ``height`` inches drawn by Agg, constrained layout on."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Figure, out: Path, stem: str) -> Path:
    """Write ``out/stem.png`` and ``out/stem.svg`` (tight bounding box); return the PNG path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / f"{stem}.png"
    fig.savefig(png, dpi=DPI, bbox_inches="tight", facecolor="white")
    # no date and fixed element ids in the SVG: regenerated figures differ only when their content does
    with matplotlib.rc_context({"svg.hashsalt": "bitalloc"}):
        fig.savefig(out / f"{stem}.svg", bbox_inches="tight", facecolor="white", metadata={"Date": None})
    log.info("wrote %s (+ .svg)", png)
    return png


def kind_colors(kinds: list[str]) -> dict[str, tuple]:
    """One distinct colour per matrix kind (tab10, then tab20 for more kinds)."""
    cmap = matplotlib.colormaps[KIND_CMAP if len(kinds) <= 10 else "tab20"]
    return {k: cmap(i % cmap.N) for i, k in enumerate(kinds)}
