"""``bitalloc.reports.report``: render every figure and write ``report.md`` that embeds them."""

from __future__ import annotations

import datetime as _dt
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bitalloc import __version__
from bitalloc.atomic import atomic_write_bytes, check_output

from .allocation_map import allocation_figure
from .data import (
    OBJECTIVES,
    Curve,
    ProfileInfo,
    check_sweep,
    fragility,
    load_allocation,
    load_evals,
    measured_for,
    pareto_curves,
    profile_info,
    read_sweep,
    resolve_objectives,
    uniform_points,
)
from .pareto import pareto_figure
from .sensitivity import sensitivity_figure

log = logging.getLogger(__name__)

REPORT_FILE = "report.md"
PathLike = str | os.PathLike[str]


def report(
    profile: PathLike,
    *,
    sweep: PathLike | None = None,
    evals: PathLike | None = None,
    allocs: Sequence[PathLike] = (),
    out: PathLike,
    objectives: Sequence[str] | str | None = None,
    budgets: Sequence[float] | str | None = None,
    force: bool = False,
) -> Path:
    """Write ``out/report.md`` with its figures (PNG + SVG) next to it; return the report path.

    A non-empty ``out`` is refused (OutputExistsError) unless ``force``, checked before any work.

    ``profile``: a profile directory. ``sweep``: a ``bitalloc sweep --out`` CSV of that profile
    (checked to be from it); objectives it lacks are computed (exact solves at ``budgets``,
    default 9 budgets across the profile's range, and the whole Lagrangian hull).
    ``evals``: a JSON-lines file of evaluated models (see :func:`~bitalloc.reports.data.load_evals`).
    ``allocs``: allocation JSON files of that profile, one map each. ``objectives``: ``plain``
    and/or ``fisher`` (default: those the profile has; a missing Fisher curve is noted).
    """
    out = check_output(out, force=force, kind="dir", what="--out")
    info = profile_info(profile)
    chosen, notes = resolve_objectives(info, objectives)
    sweep_table = None
    if sweep is not None:
        sweep_table = read_sweep(sweep)
        check_sweep(sweep_table, info, str(sweep))
    eval_table = load_evals(evals) if evals is not None else None
    alloc_data = [(Path(a), load_allocation(a, info)) for a in allocs]

    out.mkdir(parents=True, exist_ok=True)
    curves = pareto_curves(info, chosen, sweep=sweep_table, sweep_path=str(sweep), budgets=budgets)
    uniform = uniform_points(info.df)
    pareto_png = pareto_figure(info, curves, uniform, out, evals=eval_table)
    sens_objective = "fisher" if "fisher" in chosen else chosen[0]
    sens_png = sensitivity_figure(info, sens_objective, out)
    alloc_pngs = []
    stems: set[str] = set()
    for path, data in alloc_data:
        stem = _unique_stem("allocation-" + _slug(path.stem), stems)
        alloc_pngs.append(allocation_figure(data, info, out, stem))

    lines = _header(info, sweep, evals, chosen, notes)
    lines += _pareto_section(pareto_png, curves, uniform, chosen, out)
    if eval_table is not None:
        lines += _evals_section(eval_table)
    if alloc_data:
        lines += _alloc_section(alloc_data, alloc_pngs, eval_table, out)
    lines += _sensitivity_section(info, sens_objective, sens_png, out)
    path = out / REPORT_FILE
    atomic_write_bytes(path, ("\n".join(lines).rstrip() + "\n").encode())
    log.info("report written to %s", path)
    return path


# ----- helpers -----------------------------------------------------------------------------
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "allocation"


def _unique_stem(stem: str, seen: set[str]) -> str:
    candidate, n = stem, 2
    while candidate in seen:
        candidate, n = f"{stem}-{n}", n + 1
    seen.add(candidate)
    return candidate


def _rel(path: Path, out: Path) -> str:
    return Path(os.path.relpath(path, out)).as_posix()


def _fmt(value: Any, spec: str = ".6g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "-"
    if isinstance(value, (int, float)):
        return format(value, spec)
    return str(value)


def _gap(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{100 * float(value):.4g}%"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str = "") -> list[str]:
    """A GitHub markdown table; ``align`` holds one ``l``/``r`` per column (default: left)."""
    align = align or "l" * len(header)
    marks = ["---:" if a == "r" else "---" for a in align]
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(marks) + " |"]
    out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
    return out + [""]


def _figure(png: Path, out: Path, alt: str) -> list[str]:
    rel = _rel(png, out)
    return [f"![{alt}]({rel})", "", f"<sub>Vector version: [{Path(rel).with_suffix('.svg').name}]"
            f"({Path(rel).with_suffix('.svg').as_posix()})</sub>", ""]


# ----- sections ----------------------------------------------------------------------------
def _header(info: ProfileInfo, sweep, evals, objectives: list[str], notes: list[str]) -> list[str]:
    meta = info.meta
    ranks = meta.get("ranks")
    fisher = "yes" if "fisher" in info.objectives else "no"
    lines = [
        f"# bitalloc report: {info.model}",
        "",
        f"Generated {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M UTC} by bitalloc {__version__}.",
        "",
    ]
    rows = [
        ("profile", f"`{info.path}`"),
        ("model", f"`{info.model}` (hash `{meta.get('model_hash', '?')}`)"),
        ("config space", f"`{info.space}`, ranks {ranks}, {info.df['config'].nunique()} configs"),
        ("matrices", f"{len(info.matrices)} ({info.total_params:,.0f} parameters)"),
        ("Fisher-weighted errors", fisher),
        ("objectives drawn", ", ".join(objectives)),
    ]
    if sweep is not None:
        rows.append(("sweep", f"`{sweep}`"))
    if evals is not None:
        rows.append(("evals", f"`{evals}`"))
    lines += _table(["", ""], rows)
    for note in notes:
        lines += [f"> **Note:** {note}", ""]
    return lines


def _pareto_section(png: Path, curves: Sequence[Curve], uniform: pd.DataFrame, objectives: list[str],
                    out: Path) -> list[str]:
    lines = ["## Pareto front", "",
             "Predicted total error (log scale) against bits per parameter, every stored bit counted "
             "(codes, scales, low-rank factors). Dots: exact ILP solutions; lines: the Lagrangian hull "
             "(a lower bound between its vertices); crosses: the whole model at one uniform config.", ""]
    lines += _figure(png, out, "Pareto front")
    for curve in curves:
        lines += [f"### Exact allocations, {curve.objective} objective", "", f"Source: {curve.source}.", ""]
        rows = [(_fmt(r.budget, ".4g"), _fmt(r.bits_per_param, ".4f"), _fmt(r.objective),
                 _fmt(getattr(r, "bound", None)), getattr(r, "status", "-"), _gap(getattr(r, "gap", None)),
                 _fmt(getattr(r, "seconds", None), ".3f")) for r in curve.ilp.itertuples()]
        if rows:
            lines += _table(["budget", "achieved bits/param", "predicted error", "bound", "status", "gap",
                             "solver s"], rows, "rrrrlrr")
        else:
            lines += ["No feasible exact solution in this sweep.", ""]
    best = uniform[~uniform["dominated"]]
    if len(best):
        header = ["uniform config", "bits/param"] + [f"{o} error" for o in objectives]
        rows = [[f"`{r['config']}`", _fmt(r["bits_per_param"], ".4f")] + [_fmt(r[OBJECTIVES[o]]) for o in objectives]
                for _, r in best.iterrows()]
        lines += ["### Uniform configs", "",
                  f"The {len(best)} of {len(uniform)} uniform configs that no cheaper uniform config beats "
                  "(plain error):", ""]
        lines += _table(header, rows, "lr" + "r" * len(objectives))
    return lines


def _evals_section(evals: pd.DataFrame) -> list[str]:
    lines = ["## Measured quality", "",
             "Every evaluated model; baselines are the original and uniform configs.", ""]
    rows = [(r.label, r.kind, _fmt(r.bits_per_param, ".4f"), _fmt(r.perplexity, ".4f"), _fmt(r.kl, ".5f"),
             "yes" if r.baseline else "") for r in evals.sort_values("bits_per_param", na_position="last").itertuples()]
    return lines + _table(["model", "kind", "bits/param", "perplexity", "KL", "baseline"], rows, "llrrrl")


def _alloc_section(alloc_data, pngs, evals, out: Path) -> list[str]:
    lines = ["## Allocations", ""]
    rows = []
    for (path, data), png in zip(alloc_data, pngs):
        measured = measured_for(data, evals, path.stem)
        rows.append((f"[`{path.name}`](#{_anchor(path.name)})", _fmt(data.get("budget"), ".4g"),
                     _fmt(data.get("bits_per_param"), ".4f"), _fmt(data.get("objective")),
                     data.get("objective_column", "-"), data.get("status", "-"), _gap(data.get("gap")),
                     _fmt(data.get("seconds"), ".3f"),
                     "-" if measured is None else _fmt(float(measured["perplexity"]), ".4f")))
    lines += _table(["allocation", "budget", "achieved bits/param", "predicted error", "objective", "status",
                     "gap", "solver s", "measured perplexity"], rows, "lrrrllrrr")
    for (path, data), png in zip(alloc_data, pngs):
        lines += [f"### {path.name}", ""]
        hist = data.get("params_by_bits") or {}
        if hist:
            share = ", ".join(f"NF{b}: {100 * float(s):.1f}%" for b, s in hist.items())
            lines += [f"Share of parameters by NF code width: {share}.", ""]
        if data.get("note"):
            lines += [f"Solver note: {data['note']}", ""]
        lines += _figure(png, out, f"allocation map {path.name}")
    return lines


def _anchor(title: str) -> str:
    """GitHub's heading anchor for a heading text."""
    return re.sub(r"[^a-z0-9 _-]", "", title.lower()).replace(" ", "-")


def _sensitivity_section(info: ProfileInfo, objective: str, png: Path, out: Path) -> list[str]:
    ranked, ref = fragility(info.df, OBJECTIVES[objective])
    lines = ["## Sensitivity", "",
             f"Which matrices are fragile ({objective} error): left, each matrix's non-dominated configs; "
             f"right, matrices ranked by the least error they reach at {ref:.2f} bits/param or fewer.", ""]
    lines += _figure(png, out, "sensitivity")
    rows = [(f"`{r.matrix}`", _fmt(r.error), f"{100 * r.share:.1f}%", f"`{r.config}`", _fmt(r.bits_per_param, ".4f"))
            for r in ranked.head(10).itertuples()]
    lines += [f"Top {len(rows)}:", ""]
    return lines + _table(["matrix", f"least error at ≤ {ref:.2f} bits/param", "share of total", "config",
                           "its bits/param"], rows, "lrrlr")
