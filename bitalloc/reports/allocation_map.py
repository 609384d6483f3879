"""Allocation map: a layers x matrix-kinds heatmap of bits/param, and the configs chosen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd

from .data import ProfileInfo, allocation_table
from .names import layer_grid
from .plotting import new_figure, save_figure

#: Cells above this count are not annotated (the text would be unreadable).
MAX_ANNOTATED_CELLS = 600
CMAP = "viridis"


def allocation_figure(data: dict[str, Any], info: ProfileInfo, out: Path, stem: str, *, title: str = "") -> Path:
    """Draw one allocation into ``out/stem.png`` (+ .svg); return the PNG path.

    Left: layers (rows) by matrix kinds (columns, derived from the names) coloured by the
    chosen config's bits/param, each cell annotated ``NF bits / block / rank``. Right: how
    many matrices got each config, with its share of the parameters.
    """
    picked = allocation_table(data, info)
    grid = layer_grid(info.matrices)
    n_rows, n_cols = len(grid.rows), len(grid.kinds)
    values = np.full((n_rows, n_cols), np.nan)
    labels: dict[tuple[int, int], str] = {}
    by_name = picked.set_index("matrix")
    for (row, kind), name in grid.cell.items():
        if name not in by_name.index:
            continue
        r = by_name.loc[name]
        i, j = grid.rows.index(row), grid.kinds.index(kind)
        values[i, j] = float(r["bits_per_param"])
        labels[(i, j)] = f"{int(r['bits'])}/{int(r['block'])}/{int(r['rank'])}"

    counts = _config_counts(picked)
    max_kind = max(len(k) for k in grid.kinds)
    heat_w = max(3.2, 0.95 * n_cols + 1.6)
    hist_w = 3.0 + 0.065 * max(len(c) for c in counts["config"])
    height = max(4.4, min(0.26 * n_rows, 40.0) + 1.6 + 0.05 * max_kind, 0.3 * len(counts) + 1.8)
    fig = new_figure(heat_w + hist_w, height)
    ax, ax_hist = fig.subplots(1, 2, width_ratios=[heat_w, hist_w])

    vmin, vmax = np.nanmin(values), np.nanmax(values)
    if vmax - vmin < 1e-9:
        vmin, vmax = vmin - 0.5, vmax + 0.5
    cmap = matplotlib.colormaps[CMAP].with_extremes(bad="#eeeeee")  # cells without a matrix
    im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto",
                   interpolation="nearest")
    ax.set_xticks(range(n_cols), grid.kinds, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), grid.rows, fontsize=7 if n_rows > 24 else 8)
    ax.set_xlabel("matrix kind")
    ax.set_ylabel("layer")
    if n_rows * n_cols <= MAX_ANNOTATED_CELLS:
        size = 7 if n_rows <= 40 else 5.5
        for (i, j), text in labels.items():
            shade = (values[i, j] - vmin) / (vmax - vmin)
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="black" if shade > 0.55 else "white")
        ax.set_title("cell text: NF bits / block / rank", fontsize=9)
    else:
        ax.set_title(f"{n_rows * n_cols} cells: text omitted", fontsize=9)
    cbar = fig.colorbar(im, ax=ax, shrink=0.9, pad=0.02)
    cbar.set_label("bits/param of the chosen config")

    y = np.arange(len(counts))
    ax_hist.barh(y, counts["matrices"], height=0.7, color=matplotlib.colormaps[CMAP](
        (counts["bits_per_param"] - vmin) / (vmax - vmin) if vmax > vmin else 0.5))
    ax_hist.set_yticks(y, counts["config"], fontsize=8)
    # a few configs stay thin bars at the top instead of stretching over a tall figure
    ax_hist.set_ylim(max(len(counts), min(n_rows, 12)) - 0.5, -0.5)
    ax_hist.set_xlabel("matrices given this config")
    ax_hist.set_title("configs chosen (share of parameters)", fontsize=9)
    top = float(counts["matrices"].max())
    ax_hist.set_xlim(0, top * 1.35 + 0.5)
    for yi, (n, share) in enumerate(zip(counts["matrices"], counts["share"])):
        ax_hist.text(n + top * 0.02, yi, f"{int(n)} ({100 * share:.0f}%)", va="center", fontsize=7)
    ax_hist.grid(True, axis="x", alpha=0.3)
    ax_hist.xaxis.get_major_locator().set_params(integer=True)

    fig.suptitle(title or _title(data, info), fontsize=11)
    return save_figure(fig, out, stem)


def _config_counts(picked: pd.DataFrame) -> pd.DataFrame:
    picked = picked.assign(params=picked["rows"].astype(float) * picked["cols"].astype(float))
    g = picked.groupby("config")
    counts = pd.DataFrame({
        "matrices": g.size(), "params": g["params"].sum(), "bits_per_param": g["bits_per_param"].mean(),
        "bits": g["bits"].first(),
    }).reset_index()
    counts["share"] = counts["params"] / counts["params"].sum()
    return counts.sort_values(["bits", "bits_per_param", "config"], ignore_index=True)


def _title(data: dict[str, Any], info: ProfileInfo) -> str:
    budget = data.get("budget")
    achieved = data.get("bits_per_param")
    objective = data.get("objective_column", "?")
    head = f"Allocation at {budget} bits/param (achieved {achieved:.4f})" if achieved is not None else "Allocation"
    return f"{head}, objective {objective}\n{info.subtitle()}"
