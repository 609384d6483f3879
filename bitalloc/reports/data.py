"""What a report shows, as tables: Pareto curves, uniform configs, evals, allocations.

Everything here is pandas/numpy (no matplotlib), and every input is checked against the
profile: a sweep or allocation made from another profile, an empty or malformed evals file,
or a Fisher curve asked of a profile without Fisher errors is a ``ValueError`` that says so.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bitalloc.allocation import Allocation
from bitalloc.allocation import sweep as run_sweep
from bitalloc.profiles.store import load_profile
from bitalloc.solvers import lagrange_hull, profile_arrays

log = logging.getLogger(__name__)

#: Objective names and the profile columns they read.
OBJECTIVES = {"plain": "error", "fisher": "error_fisher", "act": "error_act", "kl": "error_kl"}
#: Axis labels of the predicted error per objective.
ERROR_LABELS = {
    "plain": "predicted error  Σ‖W − Ŵ‖²_F",
    "fisher": "predicted error  Σ‖√F ⊙ (W − Ŵ)‖²_F",
    "act": "predicted error  Σ tr(ΔW H ΔWᵀ)",
    "kl": "predicted KL  Σ factor · error_act",
}
#: Number of budgets the report solves exactly when no sweep is given.
DEFAULT_N_BUDGETS = 9

EVAL_REQUIRED = ("label", "bits_per_param", "perplexity")


@dataclass
class Curve:
    """The Pareto front of one objective: exact (ILP) points and the Lagrangian hull.

    ``ilp`` columns: ``budget``, ``bits_per_param``, ``objective``, ``bound``, ``status``,
    ``gap``, ``seconds``; ``hull`` columns: ``bits_per_param``, ``objective``. ``source``
    says where the points come from (a sweep CSV, or computed by the report).
    """

    objective: str
    ilp: pd.DataFrame
    hull: pd.DataFrame
    source: str


@dataclass
class ProfileInfo:
    """A loaded profile with what the report needs from it."""

    df: pd.DataFrame
    meta: dict[str, Any]
    path: str
    objectives: list[str] = field(default_factory=list)  # objectives the profile has

    @property
    def model(self) -> str:
        return str(self.meta.get("model") or "unknown model")

    @property
    def space(self) -> str:
        return str(self.meta.get("space") or "?")

    @property
    def total_params(self) -> float:
        shapes = self.df.drop_duplicates("matrix")
        return float((shapes["rows"].astype(float) * shapes["cols"].astype(float)).sum())

    @property
    def matrices(self) -> list[str]:
        return list(dict.fromkeys(self.df["matrix"].astype(str)))

    def subtitle(self) -> str:
        """``model, space S, N matrices``: the second line of figure titles."""
        return f"{self.model}, space {self.space}, {len(self.matrices)} matrices"


def profile_info(profile: str | os.PathLike[str]) -> ProfileInfo:
    """Load a profile directory for reporting."""
    df, meta = load_profile(profile)
    if df.empty:
        raise ValueError(f"profile {profile} has no rows")
    objectives = [o for o, col in OBJECTIVES.items()
                  if col in df.columns and pd.to_numeric(df[col], errors="coerce").notna().any()]
    return ProfileInfo(df=df, meta=meta, path=str(profile), objectives=objectives)


def resolve_objectives(info: ProfileInfo, objectives: Sequence[str] | str | None) -> tuple[list[str], list[str]]:
    """The objectives to draw and notes on the ones left out.

    ``None``: every objective the profile has (a profile without Fisher errors gets a note
    that the Fisher curve is omitted). Asking for ``fisher`` explicitly on such a profile is
    an error.
    """
    notes: list[str] = []
    if objectives is None:
        chosen = list(info.objectives)
        if "fisher" not in chosen:
            notes.append("Fisher curve omitted: the profile has no Fisher-weighted errors "
                         "(profiled with --no-fisher).")
        return chosen, notes
    if isinstance(objectives, str):
        objectives = [o.strip() for o in objectives.split(",") if o.strip()]
    chosen = []
    for o in objectives:
        if o not in OBJECTIVES:
            raise ValueError(f"unknown objective {o!r}; use any of {', '.join(OBJECTIVES)}")
        if o not in info.objectives:
            raise ValueError(
                f"objective {o!r} asked for, but profile {info.path} has no "
                f"{OBJECTIVES[o]!r} values (profiled without it, e.g. --no-fisher, --no-act or --no-kl); "
                "drop it, or rerun the profile command without that flag (it resumes)"
            )
        if o not in chosen:
            chosen.append(o)
    if not chosen:
        raise ValueError(f"no objective to report; use any of {', '.join(OBJECTIVES)}")
    return chosen, notes


# ----- per-matrix and uniform numbers --------------------------------------------------------
def bits_range(df: pd.DataFrame) -> tuple[float, float]:
    """(cheapest, dearest) whole-model bits/param: every matrix at its fewest / most bits."""
    per = df.groupby("matrix").agg(lo=("storage_bits", "min"), hi=("storage_bits", "max"),
                                   rows=("rows", "first"), cols=("cols", "first"))
    params = float((per["rows"].astype(float) * per["cols"].astype(float)).sum())
    return float(per["lo"].sum()) / params, float(per["hi"].sum()) / params


def uniform_points(df: pd.DataFrame) -> pd.DataFrame:
    """One row per config that every matrix has: the whole model at that config.

    Columns ``config``, ``bits_per_param`` (Σ storage bits / Σ params), ``error`` and
    ``error_fisher`` (Σ over matrices; NaN without Fisher), ``dominated`` (another uniform
    config has no more bits and less error, plain objective).
    """
    n = df["matrix"].nunique()
    counts = df.groupby("config")["matrix"].nunique()
    full = counts.index[counts == n]
    sub = df[df["config"].isin(full)].copy()
    sub["params"] = sub["rows"].astype(float) * sub["cols"].astype(float)
    g = sub.groupby("config", sort=False)
    out = pd.DataFrame({
        "bits_per_param": g["storage_bits"].sum().astype(float) / g["params"].sum(),
        "error": g["error"].sum(min_count=n),
        **{column: g[column].sum(min_count=n) for column in OBJECTIVES.values() if column != "error"},
    }).reset_index().sort_values(["bits_per_param", "error"], ignore_index=True)
    best = np.minimum.accumulate(out["error"].to_numpy()) if len(out) else np.array([])
    prev = np.concatenate([[np.inf], best[:-1]]) if len(out) else np.array([])
    out["dominated"] = out["error"].to_numpy() >= prev
    return out


def matrix_fronts(df: pd.DataFrame, column: str) -> dict[str, pd.DataFrame]:
    """Per matrix, its non-dominated configs: ``bits_per_param``, ``error`` (of ``column``), ``config``."""
    fronts: dict[str, pd.DataFrame] = {}
    for name, g in df.groupby("matrix", sort=False):
        g = g[["config", "bits_per_param", column]].dropna().sort_values(["bits_per_param", column])
        g = g.rename(columns={column: "error"})
        keep = g["error"].to_numpy() < np.concatenate([[np.inf], np.minimum.accumulate(g["error"].to_numpy())[:-1]])
        fronts[str(name)] = g[keep].reset_index(drop=True)
    return fronts


def fragility(df: pd.DataFrame, column: str, reference_bits: float | None = None) -> tuple[pd.DataFrame, float]:
    """Rank matrices by the least error they reach at or below ``reference_bits`` bits/param.

    The default reference is 3 bits/param, raised to the smallest value at which every matrix
    has a config (so every matrix gets a number). Returns ``(table, reference)``; the table
    has ``matrix``, ``error``, ``config``, ``share`` (of the total), sorted by error, largest first.
    """
    lows = df.groupby("matrix")["bits_per_param"].min()
    floor = float(lows.max())
    ref = float(reference_bits) if reference_bits is not None else max(3.0, floor)
    rows = []
    for name, g in df.groupby("matrix", sort=False):
        g = g[(g["bits_per_param"] <= ref + 1e-12) & g[column].notna()]
        if g.empty:
            continue
        best = g.loc[g[column].idxmin()]
        rows.append({"matrix": str(name), "error": float(best[column]), "config": str(best["config"]),
                     "bits_per_param": float(best["bits_per_param"])})
    table = pd.DataFrame(rows, columns=["matrix", "error", "config", "bits_per_param"])
    total = table["error"].sum()
    table["share"] = table["error"] / total if total > 0 else np.nan
    return table.sort_values("error", ascending=False, ignore_index=True), ref


# ----- Pareto curves ----------------------------------------------------------------------
def default_budgets(df: pd.DataFrame, n: int = DEFAULT_N_BUDGETS) -> list[float]:
    """``n`` budgets evenly spread from the cheapest to the dearest allocation (rounded to 0.01)."""
    lo, hi = bits_range(df)
    lo_r, hi_r = math.ceil(lo * 100 - 1e-9) / 100, math.floor(hi * 100 + 1e-9) / 100
    if hi_r <= lo_r:
        return [round(lo_r, 2)]
    return sorted({round(float(b), 2) for b in np.linspace(lo_r, hi_r, n)})


def _objective_name(value: Any) -> str:
    text = str(value)
    for name, column in OBJECTIVES.items():
        if text in (name, column):
            return name
    return text


def read_sweep(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a sweep CSV (``bitalloc sweep --out``) and check its columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {path} does not exist")
    try:
        table = pd.read_csv(path)
    except pd.errors.EmptyDataError:
        raise ValueError(f"sweep file {path} is empty; write one with `bitalloc sweep PROFILE --budgets A:B:STEP --out {path}`")
    except Exception as exc:  # pandas raises several parser error types
        raise ValueError(f"sweep file {path} is not a readable CSV ({exc})") from exc
    missing = [c for c in ("kind", "bits_per_param", "objective") if c not in table.columns]
    if missing:
        raise ValueError(f"{path} is not a bitalloc sweep CSV: missing columns {missing}")
    if table.empty:
        raise ValueError(f"sweep file {path} has no rows")
    if "objective_column" not in table.columns:
        table["objective_column"] = "plain"
    table["objective_column"] = table["objective_column"].map(_objective_name)
    return table


def check_sweep(table: pd.DataFrame, info: ProfileInfo, path: str = "the sweep") -> None:
    """Refuse a sweep that was not made from this profile.

    Sweeps record ``model_hash`` and ``profile_sha256``: both must match the profile. Older
    sweeps without them are checked numerically: every exact point must lie inside the
    profile's bits/param range and on or above its Lagrangian lower bound.
    """
    meta = info.meta
    for column, expect, what in (
        ("model_hash", meta.get("model_hash"), "model hash"),
        ("profile_sha256", (meta.get("table") or {}).get("sha256"), "profile table sha256"),
    ):
        if column in table.columns and expect:
            seen = {str(v) for v in table[column].dropna().unique()}
            if seen and seen != {str(expect)}:
                raise ValueError(
                    f"{path} was made from another profile: its {what} is {sorted(seen)[0]}, "
                    f"profile {info.path} has {expect}; rerun `bitalloc sweep {info.path}`"
                )
    for objective in table["objective_column"].unique():
        if objective not in OBJECTIVES:
            raise ValueError(f"{path} has objective {objective!r}; the report draws {', '.join(OBJECTIVES)}")
        if objective not in info.objectives:
            raise ValueError(
                f"{path} holds {objective} errors, but profile {info.path} has none "
                "(profiled without that column): a sweep from another profile?"
            )
    lo, hi = bits_range(info.df)
    ilp = _feasible_ilp(table)
    tol = 1e-6
    outside = ilp[(ilp["bits_per_param"] < lo - tol) | (ilp["bits_per_param"] > hi + tol)]
    if len(outside):
        r = outside.iloc[0]
        raise ValueError(
            f"{path} does not match profile {info.path}: a point at {r.bits_per_param:.4f} bits/param "
            f"lies outside the profile's range {lo:.4f}..{hi:.4f}; a sweep from another profile?"
        )
    for objective, rows in ilp.groupby("objective_column"):
        hull = _hull(info.df, objective)
        bound = np.interp(rows["bits_per_param"].to_numpy(float), hull["bits_per_param"], hull["objective"])
        below = rows["objective"].to_numpy(float) < bound * (1 - 1e-6) - 1e-9
        if below.any():
            r = rows[below].iloc[0]
            raise ValueError(
                f"{path} does not match profile {info.path}: at {r.bits_per_param:.4f} bits/param it "
                f"claims {objective} error {r.objective:.6g}, below the profile's lower bound "
                f"{bound[below][0]:.6g}; a sweep from another profile?"
            )


def _feasible_ilp(table: pd.DataFrame) -> pd.DataFrame:
    ilp = table[table["kind"] == "ilp"].copy()
    if "status" in ilp.columns:
        ilp = ilp[ilp["status"].astype(str) != "infeasible"]
    ilp = ilp[pd.to_numeric(ilp["objective"], errors="coerce").notna()]
    return ilp


def _hull(df: pd.DataFrame, objective: str) -> pd.DataFrame:
    a = profile_arrays(df, objective=objective)
    return lagrange_hull(a.error, a.storage_bits, a.numel, matrix_names=a.matrices)


def pareto_curves(
    info: ProfileInfo,
    objectives: Sequence[str],
    *,
    sweep: pd.DataFrame | None = None,
    sweep_path: str = "the sweep",
    budgets: Sequence[float] | str | None = None,
) -> list[Curve]:
    """One :class:`Curve` per objective: from the sweep where it has that objective, else computed.

    Computed curves solve the profile exactly (HiGHS, no ties or bounds) at ``budgets``
    (default :func:`default_budgets`) and take the whole Lagrangian hull.
    """
    curves = []
    for objective in objectives:
        if sweep is not None and (sweep["objective_column"] == objective).any():
            rows = sweep[sweep["objective_column"] == objective]
            ilp = _feasible_ilp(rows).sort_values("bits_per_param", ignore_index=True)
            hull = rows[rows["kind"] == "hull"].sort_values("bits_per_param", ignore_index=True)
            source = f"sweep `{sweep_path}`"
            if "budget_bits_per_param" in ilp.columns and (
                    ilp["budget_bits_per_param"] < ilp["bits_per_param"] - 1e-9).any():
                # LQ-LoRA's convention: the sweep's hull counts budget bits (factors left out), its exact
                # points every stored bit; draw both in stored bits
                hull = _hull(info.df, objective)
                source += ("; its budget left the low-rank factors out, so the hull drawn is the profile's "
                           "own (every stored bit, no ties)")
            curves.append(Curve(objective, ilp, hull, source))
            continue
        chosen = default_budgets(info.df) if budgets is None else budgets
        log.info("solving %s at %s budgets for the Pareto figure", objective,
                 len(chosen) if not isinstance(chosen, str) else chosen)
        pareto, _, _ = run_sweep((info.df, info.meta), chosen, objective=objective, progress=False)
        ilp = _feasible_ilp(pareto).sort_values("bits_per_param", ignore_index=True)
        hull = pareto[pareto["kind"] == "hull"].sort_values("bits_per_param", ignore_index=True)
        n = len(pareto[pareto["kind"] == "ilp"])
        curves.append(Curve(objective, ilp, hull, f"computed by the report ({n} budgets, HiGHS, no ties)"))
    return curves


# ----- evals ---------------------------------------------------------------------------------
def load_evals(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read an evals JSON-lines file (one evaluated model per line).

    Required keys: ``label`` (str), ``bits_per_param`` (number, or null for the unquantized
    original), ``perplexity`` (number). Optional: ``kl``, ``baseline`` (bool), ``kind``,
    ``budget``, ``objective``, ``rank_mode`` (how the rank was set, e.g. ``fixed`` or
    ``solver``: points of one objective and rank mode make one curve), ``model``; other keys
    are ignored. Blank lines are skipped;
    an empty file, bad JSON or a missing key is an error naming the line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"evals file {path} does not exist")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {number}: not valid JSON ({exc})") from exc
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {number}: expected a JSON object, got {type(obj).__name__}")
        missing = [k for k in EVAL_REQUIRED if k not in obj]
        if missing:
            raise ValueError(f"{path}, line {number}: missing key(s) {missing} (needs {list(EVAL_REQUIRED)})")
        records.append(_eval_record(obj, path, number))
    if not records:
        raise ValueError(f"evals file {path} is empty: expected one JSON object per line "
                         "(from `bitalloc eval ... --json`)")
    return pd.DataFrame.from_records(records)


def _number(value: Any, where: str, key: str, *, nullable: bool) -> float:
    if value is None and nullable:
        return float("nan")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ValueError(f"{where}: {key} must be a finite number{' or null' if nullable else ''}, got {value!r}")
    return float(value)


def _eval_record(obj: dict[str, Any], path: Path, number: int) -> dict[str, Any]:
    where = f"{path}, line {number}"
    bits = _number(obj["bits_per_param"], where, "bits_per_param", nullable=True)
    kind = obj.get("kind")
    kind = str(kind) if kind is not None else ("original" if math.isnan(bits) else "bitalloc")
    baseline = obj.get("baseline")
    baseline = bool(baseline) if baseline is not None else kind in ("original", "uniform")
    budget = obj.get("budget")
    return {
        "label": str(obj["label"]),
        "model": str(obj.get("model", "")),
        "bits_per_param": bits,
        "perplexity": _number(obj["perplexity"], where, "perplexity", nullable=False),
        "kl": _number(obj.get("kl"), where, "kl", nullable=True),
        "baseline": baseline,
        "kind": kind,
        "budget": _number(budget, where, "budget", nullable=True),
        "objective": _objective_name(obj["objective"]) if obj.get("objective") is not None else "",
        "rank_mode": str(obj["rank_mode"]) if obj.get("rank_mode") is not None else None,
    }


# ----- allocations ----------------------------------------------------------------------------
def load_allocation(path: str | os.PathLike[str], info: ProfileInfo) -> dict[str, Any]:
    """Read an allocation JSON and check that it belongs to the profile.

    Its ``provenance.model_hash`` (when recorded) must match the profile's, and every
    (matrix, config) it assigns must be in the profile.
    """
    data = Allocation.load(path).to_dict()
    expect = info.meta.get("model_hash")
    got = (data.get("provenance") or {}).get("model_hash")
    if expect and got and str(got) != str(expect):
        raise ValueError(f"allocation {path} was solved for model hash {got}, but profile "
                         f"{info.path} has {expect}: an allocation from another profile?")
    pairs = set(zip(info.df["matrix"].astype(str), info.df["config"].astype(str)))
    matrices = set(info.df["matrix"].astype(str))
    for matrix, config in data["assignments"].items():
        if matrix not in matrices:
            raise ValueError(f"allocation {path} assigns {matrix!r}, which profile {info.path} does "
                             "not have: an allocation from another profile?")
        if (matrix, str(config)) not in pairs:
            raise ValueError(f"allocation {path} gives {matrix!r} config {config!r}, which profile "
                             f"{info.path} did not measure for it")
    if not data["assignments"]:
        raise ValueError(f"allocation {path} assigns no matrices (infeasible budget?)")
    return data


def allocation_table(data: dict[str, Any], info: ProfileInfo) -> pd.DataFrame:
    """The profile rows an allocation picked: one per assigned matrix (with bits, block, rank, errors)."""
    picked = pd.DataFrame(list(data["assignments"].items()), columns=["matrix", "config"])
    df = info.df.astype({"matrix": str, "config": str})
    return picked.merge(df, on=["matrix", "config"], how="left")


def measured_for(data: dict[str, Any], evals: pd.DataFrame | None, stem: str) -> pd.Series | None:
    """The evals row of an allocation: same label as the file stem, else same budget and objective."""
    if evals is None or evals.empty:
        return None
    hit = evals[evals["label"] == stem]
    if hit.empty and data.get("budget") is not None:
        objective = _objective_name(data.get("objective_column", ""))
        same = (evals["budget"] - float(data["budget"])).abs() < 1e-9
        if objective:
            same &= evals["objective"].isin([objective, ""])
        hit = evals[same & ~evals["baseline"]]
    return None if hit.empty else hit.iloc[0]
