"""The Pareto figure: predicted error against bits/param, and measured quality where evaluated."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .data import ERROR_LABELS, Curve, ProfileInfo
from .plotting import BASELINE_COLOR, OBJECTIVE_COLORS, new_figure, save_figure

MAX_POINT_LABELS = 8


def pareto_figure(
    info: ProfileInfo,
    curves: Sequence[Curve],
    uniform: pd.DataFrame,
    out: Path,
    *,
    evals: pd.DataFrame | None = None,
    stem: str = "pareto",
) -> Path:
    """Draw the Pareto figure into ``out/stem.png`` (+ .svg); return the PNG path.

    Left panel: predicted total error (log scale) against bits/param, per objective the exact
    ILP points and the Lagrangian hull, and the uniform configs as reference points. With
    ``evals``: measured perplexity (and KL, when any is recorded) against bits/param for every
    evaluated model, baselines marked.
    """
    has_kl = evals is not None and evals["kl"].notna().any()
    panels = 1 + (evals is not None) + bool(has_kl)
    fig = new_figure(6.4 * panels if panels > 1 else 8.0, 5.2)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    _error_panel(axes[0], curves, uniform)
    if evals is not None:
        xlim = axes[0].get_xlim()
        _measured_panel(axes[1], evals, "perplexity", "measured perplexity (lower is better)", "measured perplexity", xlim)
        if has_kl:
            _measured_panel(axes[2], evals, "kl", "mean per-token KL to the original (nats)",
                            "KL divergence to the original", xlim)
    fig.suptitle(f"Pareto front: {info.subtitle()}", fontsize=12)
    return save_figure(fig, out, stem)


def _error_panel(ax, curves: Sequence[Curve], uniform: pd.DataFrame) -> None:
    for curve in curves:
        color = OBJECTIVE_COLORS.get(curve.objective, "black")
        hull = curve.hull
        if len(hull):
            ax.plot(hull["bits_per_param"], hull["objective"], "-", color=color, lw=1.3, alpha=0.75,
                    label=f"{curve.objective}: Lagrangian hull")
        ilp = curve.ilp
        if len(ilp):
            ax.plot(ilp["bits_per_param"], ilp["objective"], "o", color=color, ms=5,
                    label=f"{curve.objective}: exact ILP ({len(ilp)} budgets)")
        column = "error" if curve.objective == "plain" else "error_fisher"
        if len(uniform) and uniform[column].notna().any():
            ax.plot(uniform["bits_per_param"], uniform[column], "x", color=color, ms=5, alpha=0.55, mew=1.2,
                    label=f"{curve.objective}: uniform configs ({len(uniform)})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (everything stored counted)")
    objectives = [c.objective for c in curves]
    ylabel = ERROR_LABELS[objectives[0]] if len(objectives) == 1 else "predicted total error (sum over matrices)"
    ax.set_ylabel(ylabel + "  [log]")
    ax.set_title("predicted error (profile)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.grid(True, which="minor", axis="y", alpha=0.1)
    _clip_x_to_data(ax, curves, uniform)
    if ax.get_legend_handles_labels()[0]:
        # below a convex, falling front the lower left is empty: the hull is a lower bound
        ax.legend(loc="lower left", fontsize=8, framealpha=0.9)


def _clip_x_to_data(ax, curves: Sequence[Curve], uniform: pd.DataFrame) -> None:
    xs = [c.ilp["bits_per_param"].to_numpy(float) for c in curves if len(c.ilp)]
    xs += [c.hull["bits_per_param"].to_numpy(float) for c in curves if len(c.hull)]
    if len(uniform):
        xs.append(uniform["bits_per_param"].to_numpy(float))
    if xs:
        allx = np.concatenate(xs)
        lo, hi = float(np.nanmin(allx)), float(np.nanmax(allx))
        pad = 0.03 * max(hi - lo, 0.1)
        ax.set_xlim(lo - pad, hi + pad)


#: measured perplexities above this multiple of the lowest are drawn off scale (and listed)
OFF_SCALE_FACTOR = 20.0


def _measured_panel(ax, evals: pd.DataFrame, column: str, ylabel: str, title: str,
                    empty_xlim: tuple[float, float]) -> None:
    rows = evals[evals[column].notna()]
    quantized = rows[rows["bits_per_param"].notna()]
    original = rows[rows["bits_per_param"].isna()]
    base = quantized[quantized["baseline"]]
    ours = quantized[~quantized["baseline"]]
    if len(base):
        ax.plot(base["bits_per_param"], base[column], "s", color=BASELINE_COLOR, mfc="none", ms=7, mew=1.5,
                label="baseline (uniform)")
    if "rank_mode" not in ours.columns:
        ours = ours.assign(rank_mode="")
    styles = iter(("o-", "^--", "s:", "d-."))
    curves = ours.fillna({"objective": "", "rank_mode": ""}).groupby(["objective", "rank_mode"], sort=True)
    for (objective, mode), group in curves:
        color = OBJECTIVE_COLORS.get(str(objective), "#2ca02c")
        name = f"bitalloc ({objective})" if objective else "bitalloc"
        name += f", rank {mode}" if mode else ""
        g = group.sort_values("bits_per_param")
        ax.plot(g["bits_per_param"], g[column], next(styles, "o-"), color=color, ms=6, lw=1, label=name)
    for r in original.itertuples():
        name = "original (unquantized)" if r.label == "original" else f"original: {r.label}"
        ax.axhline(getattr(r, column), color="black", ls="--", lw=1, label=name)
    if len(quantized) <= MAX_POINT_LABELS:
        for r in quantized.itertuples():
            ax.annotate(r.label, (r.bits_per_param, getattr(r, column)), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color="#333333")
    values = rows[column].to_numpy(float)
    positive = values[values > 0]
    if len(positive) and (column == "kl" or positive.max() / positive.min() > 10):
        ax.set_yscale("log")
        ylabel += "  [log]"
    if column == "perplexity" and len(positive):  # a destroyed model must not flatten everything else
        cap = OFF_SCALE_FACTOR * float(positive.min())
        off = rows[rows[column] > cap]
        if len(off):
            ax.set_ylim(top=cap)
            note = ", ".join(f"{r.label} ({getattr(r, column):.3g})" for r in off.itertuples())
            ax.text(0.02, 0.02, f"off scale (above {cap:.3g}):\n" + note.replace(", ", "\n"),
                    transform=ax.transAxes, va="bottom", fontsize=6, color="#aa0000")
    ax.set_xlabel("bits per parameter (everything stored counted)")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if not len(quantized):
        ax.text(0.5, 0.75, "no quantized model evaluated", transform=ax.transAxes, ha="center", va="center",
                color="#777777")
        ax.set_xlim(*empty_xlim)
    else:
        lo, hi = float(quantized["bits_per_param"].min()), float(quantized["bits_per_param"].max())
        if hi - lo < 1.0:  # at least one bit/param wide
            mid = (lo + hi) / 2
            lo, hi = mid - 0.5, mid + 0.5
        pad = 0.08 * (hi - lo)
        ax.set_xlim(lo - pad, hi + pad * 2.5)  # room on the right for point labels
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)

