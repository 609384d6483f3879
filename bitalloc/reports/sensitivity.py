"""Sensitivity figure: which matrices are fragile (lose most when given few bits)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import ERROR_LABELS, OBJECTIVES, ProfileInfo, fragility, matrix_fronts
from .names import short_name, split_name
from .plotting import kind_colors, new_figure, save_figure

#: Matrices shown in the ranked panel.
TOP_N = 25
#: Up to this many matrices the left panel labels each line; beyond, one legend entry per kind.
MAX_LINE_LABELS = 10


def sensitivity_figure(info: ProfileInfo, objective: str, out: Path, *, stem: str = "sensitivity",
                       reference_bits: float | None = None) -> Path:
    """Draw the sensitivity figure into ``out/stem.png`` (+ .svg); return the PNG path.

    Left: every matrix's non-dominated configs, error (log) against bits/param, coloured by
    matrix kind. Right: matrices ranked by the least error they reach at ``reference_bits``
    bits/param or fewer (see :func:`bitalloc.reports.data.fragility`): the top ones are the
    fragile layers.
    """
    column = OBJECTIVES[objective]
    fronts = matrix_fronts(info.df, column)
    kinds = list(dict.fromkeys(split_name(m).kind for m in fronts))
    colors = kind_colors(kinds)
    ranked, ref = fragility(info.df, column, reference_bits)
    top = ranked.head(TOP_N)

    fig = new_figure(13.0, max(5.0, 0.22 * len(top) + 1.8))
    ax, ax_rank = fig.subplots(1, 2, width_ratios=[1.15, 1.0])
    label_lines = len(fronts) <= MAX_LINE_LABELS
    seen: set[str] = set()
    for name, front in fronts.items():
        kind = split_name(name).kind
        label = short_name(name) if label_lines else (kind if kind not in seen else None)
        seen.add(kind)
        ax.plot(front["bits_per_param"], front["error"], "-", marker="." if label_lines else None,
                color=colors[kind], lw=1.0, alpha=0.85 if label_lines else 0.55, label=label)
    ax.axvline(ref, color="#888888", ls=":", lw=1)
    ax.annotate(f"ranking at ≤ {ref:.2f} bits/param", (ref, 0.01), xycoords=("data", "axes fraction"),
                xytext=(4, 0), textcoords="offset points", fontsize=7, color="#555555", va="bottom")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter of the matrix's config")
    ax.set_ylabel(ERROR_LABELS[objective].replace("predicted error  Σ", "error  ") + "  [log]")
    ax.set_title(f"each matrix's best configs ({len(fronts)} matrices)", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="upper right", fontsize=7, framealpha=0.9, title=None if label_lines else "matrix kind",
              title_fontsize=7, ncol=1 if len(kinds) <= 12 else 2)

    y = np.arange(len(top))
    ax_rank.barh(y, top["error"], color=[colors[split_name(m).kind] for m in top["matrix"]])
    ax_rank.set_yticks(y, [short_name(m) for m in top["matrix"]], fontsize=7)
    ax_rank.invert_yaxis()
    ax_rank.set_xlabel(f"least {objective} error at ≤ {ref:.2f} bits/param")
    shown = f"top {len(top)} of {len(ranked)}" if len(ranked) > len(top) else f"all {len(ranked)}"
    ax_rank.set_title(f"most fragile matrices ({shown}; share of the total in brackets)", fontsize=10)
    hi = float(top["error"].max()) if len(top) else 1.0
    ax_rank.set_xlim(0, hi * 1.18 if hi > 0 else 1.0)  # room for the share labels
    for yi, (err, share) in enumerate(zip(top["error"], top["share"])):
        ax_rank.text(err + hi * 0.01, yi, f"({100 * share:.1f}%)", va="center", fontsize=6.5, color="#333333")
    ax_rank.grid(True, axis="x", alpha=0.3)
    fig.suptitle(f"Sensitivity ({objective} error): {info.subtitle()}", fontsize=12)
    return save_figure(fig, out, stem)
