"""Profile tables to solver arrays, and solve/sweep/allocation helpers at that level.

A profile table has one row per (matrix, config) with at least the columns ``matrix``,
``rows``, ``cols``, ``config``, ``storage_bits``, ``error`` and ``error_fisher``. These
helpers turn it into the M x C arrays the solvers take, apply ties and bit bounds by
name, and build the Allocation JSON dict. Pure pandas/numpy; no torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..configs import QuantConfig
from .lagrange import lagrange_hull
from .solution import Solution, json_ready
from .solve import solve
from .specs import Bound, apply_bit_bounds, parse_bounds, parse_budgets, tie_groups
from .sweep import sweep

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("matrix", "rows", "cols", "config", "storage_bits")
#: Objective names and the profile columns they read.
OBJECTIVE_COLUMNS = {"plain": "error", "fisher": "error_fisher"}


@dataclass
class ProfileArrays:
    """A profile as solver arrays: rows are matrices, columns configs (NaN = not profiled)."""

    matrices: list[str]
    configs: list[str]
    error: np.ndarray  # (M, C) the objective column
    storage_bits: np.ndarray  # (M, C) every stored bit
    budget_bits: np.ndarray  # (M, C) the bits the budget counts
    rows: np.ndarray  # (M,)
    cols: np.ndarray  # (M,)
    objective_column: str
    exclude_lowrank_from_budget: bool = False

    @property
    def numel(self) -> np.ndarray:
        return (self.rows * self.cols).astype(np.float64)


def _objective_column(df: pd.DataFrame, objective: str) -> str:
    column = OBJECTIVE_COLUMNS.get(objective, objective)
    if column not in df.columns:
        known = sorted(set(OBJECTIVE_COLUMNS) | {c for c in df.columns if str(c).startswith("error")})
        raise ValueError(f"objective {objective!r}: the profile has no column {column!r}; use one of {known}")
    values = pd.to_numeric(df[column], errors="coerce")
    if values.isna().all():
        if objective == "fisher":
            raise ValueError(
                "objective 'fisher' needs Fisher-weighted errors, but the profile's "
                "error_fisher column is all NaN (profiled without a Fisher estimate); "
                "profile with --fisher or use objective='plain'"
            )
        raise ValueError(f"objective {objective!r}: column {column!r} is all NaN")
    return column


def profile_arrays(
    df: pd.DataFrame, *, objective: str = "fisher", exclude_lowrank_from_budget: bool = False
) -> ProfileArrays:
    """Pivot a profile table into arrays; matrices and configs keep their first-seen order.

    ``objective``: "plain" (column ``error``), "fisher" (``error_fisher``) or a column name.
    ``exclude_lowrank_from_budget``: LQ-LoRA's convention, the budget leaves out the
    low-rank factors (``QuantConfig.lowrank_storage_bits``); ``storage_bits`` keeps them.
    """
    if not isinstance(df, pd.DataFrame):
        raise ValueError(f"a profile table must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"profile table lacks columns {missing}; it needs {list(REQUIRED_COLUMNS)}")
    if df.empty:
        raise ValueError("the profile table has no rows")
    column = _objective_column(df, objective)
    dup = df.duplicated(["matrix", "config"], keep=False)
    if dup.any():
        pairs = df.loc[dup, ["matrix", "config"]].drop_duplicates().head(3).values.tolist()
        raise ValueError(f"profile table has repeated (matrix, config) rows, e.g. {pairs}")
    m_idx, matrices = pd.factorize(df["matrix"].astype(str), sort=False)
    c_idx, configs = pd.factorize(df["config"].astype(str), sort=False)
    shapes = df.groupby(m_idx)[["rows", "cols"]].nunique()
    bad = shapes.index[(shapes["rows"] > 1) | (shapes["cols"] > 1)]
    if len(bad):
        raise ValueError(f"matrix {matrices[bad[0]]!r} has rows with different shapes in the profile")
    n_mat, n_cfg = len(matrices), len(configs)
    first = df.groupby(m_idx)[["rows", "cols"]].first().sort_index()
    rows = first["rows"].to_numpy(dtype=np.int64)
    cols = first["cols"].to_numpy(dtype=np.int64)

    def pivot(values: np.ndarray) -> np.ndarray:
        out = np.full((n_mat, n_cfg), np.nan)
        out[m_idx, c_idx] = values
        return out

    error = pivot(pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64))
    storage = pivot(pd.to_numeric(df["storage_bits"], errors="coerce").to_numpy(dtype=np.float64))
    budget_bits = storage
    if exclude_lowrank_from_budget:
        lowrank = np.zeros(len(df))
        keys = pd.DataFrame({"c": c_idx, "r": rows[m_idx], "k": cols[m_idx]})
        parsed: dict[int, QuantConfig] = {}
        for (c, r, k), where in keys.groupby(["c", "r", "k"]).indices.items():
            if c not in parsed:
                try:
                    parsed[c] = QuantConfig.from_name(configs[c])
                except ValueError as exc:
                    raise ValueError(
                        f"exclude_lowrank_from_budget needs QuantConfig names; {exc}"
                    ) from exc
            lowrank[where] = parsed[c].lowrank_storage_bits(int(r), int(k))
        budget_bits = storage - pivot(lowrank)
    return ProfileArrays(
        matrices=list(matrices),
        configs=list(configs),
        error=error,
        storage_bits=storage,
        budget_bits=budget_bits,
        rows=rows,
        cols=cols,
        objective_column=column,
        exclude_lowrank_from_budget=exclude_lowrank_from_budget,
    )


@dataclass
class _Prepared:
    arrays: ProfileArrays
    error: np.ndarray
    bits: np.ndarray
    ties: list[list[int]]
    min_bits: list[Bound]
    max_bits: list[Bound]


def _prepare(
    df: pd.DataFrame,
    *,
    objective: str,
    ties_patterns: str | Sequence[str],
    min_bits: Any,
    max_bits: Any,
    exclude_lowrank_from_budget: bool,
) -> _Prepared:
    arrays = profile_arrays(df, objective=objective, exclude_lowrank_from_budget=exclude_lowrank_from_budget)
    ties = tie_groups(arrays.matrices, ties_patterns) if ties_patterns else []
    floors, ceilings = parse_bounds(min_bits), parse_bounds(max_bits)
    error, bits = arrays.error, arrays.budget_bits
    if floors or ceilings:
        allowed = apply_bit_bounds(bits / arrays.numel[:, None], arrays.matrices, floors, ceilings)
        error = np.where(allowed, error, np.nan)
        bits = np.where(allowed, bits, np.nan)
    return _Prepared(arrays, error, bits, ties, floors, ceilings)


def _extra(prep: _Prepared) -> dict[str, Any]:
    a = prep.arrays
    return {
        "objective_column": a.objective_column,
        "exclude_lowrank_from_budget": a.exclude_lowrank_from_budget,
        "n_configs": len(a.configs),
        "total_params": int(a.numel.sum()),
        "ties": [[a.matrices[m] for m in tie] for tie in prep.ties],
        "min_bits": [list(b) for b in prep.min_bits],
        "max_bits": [list(b) for b in prep.max_bits],
    }


def _finish(prep: _Prepared, sol: Solution) -> tuple[Solution, dict[str, str], dict[str, Any]]:
    a = prep.arrays
    extra = _extra(prep)
    if not sol.feasible:
        return sol, {}, extra
    rows = np.arange(len(a.matrices))
    full = float(a.storage_bits[rows, sol.choice].sum()) / float(a.numel.sum())
    sol.full_bits_per_param = full
    assignments = {a.matrices[m]: a.configs[c] for m, c in enumerate(sol.choice.tolist())}
    extra["budget_bits_per_param"] = sol.bits_per_param
    extra["params_by_bits"] = _params_by_bits(assignments, dict(zip(a.matrices, a.numel.tolist())))
    return sol, assignments, extra


def solve_table(
    df: pd.DataFrame,
    budget: float,
    *,
    objective: str = "fisher",
    ties_patterns: str | Sequence[str] = (),
    min_bits: Any = (),
    max_bits: Any = (),
    exclude_lowrank_from_budget: bool = False,
    backend: str = "highs",
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> tuple[Solution, dict[str, str], dict[str, Any]]:
    """Solve a profile table at ``budget`` bits/param.

    Returns the Solution (with ``full_bits_per_param`` counting every stored bit), the
    assignments ``{matrix name: config name}``, and an ``extra`` dict meant for
    ``allocation_dict(solution, assignments, budget, profile_id, **extra)``.
    ``ties_patterns``: regexes (or "fuse" for :data:`FUSE_PRESET`); ``min_bits`` /
    ``max_bits``: ``"REGEX=BITS"`` specs.
    """
    prep = _prepare(
        df, objective=objective, ties_patterns=ties_patterns, min_bits=min_bits,
        max_bits=max_bits, exclude_lowrank_from_budget=exclude_lowrank_from_budget,
    )
    a = prep.arrays
    sol = solve(
        prep.error, prep.bits, a.numel, budget, ties=prep.ties, backend=backend,
        time_limit=time_limit, mip_gap=mip_gap, matrix_names=a.matrices,
    )
    return _finish(prep, sol)


@dataclass
class TableSweep:
    """The answer of :func:`sweep_table`: one Solution and assignments per budget, plus the hull."""

    budgets: list[float]
    solutions: list[Solution]
    assignments: list[dict[str, str]]
    hull: pd.DataFrame
    extra: dict[str, Any] = field(default_factory=dict)
    extras: list[dict[str, Any]] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        """One row per budget: achieved bits, objective, bound, status, gap, seconds."""
        return pd.DataFrame(
            [
                {
                    "budget": s.budget,
                    "bits_per_param": s.full_bits_per_param if s.full_bits_per_param is not None else s.bits_per_param,
                    "budget_bits_per_param": s.bits_per_param,
                    "objective": s.objective,
                    "bound": s.bound,
                    "status": s.status,
                    "gap": s.gap,
                    "seconds": s.seconds,
                    "backend": s.backend,
                }
                for s in self.solutions
            ]
        )

    def allocations(self, profile_id: str) -> list[dict[str, Any]]:
        """Allocation JSON dicts, one per budget."""
        return [
            allocation_dict(s, a, b, profile_id, **e)
            for s, a, b, e in zip(self.solutions, self.assignments, self.budgets, self.extras)
        ]


def sweep_table(
    df: pd.DataFrame,
    budgets: Sequence[float] | str,
    *,
    objective: str = "fisher",
    ties_patterns: str | Sequence[str] = (),
    min_bits: Any = (),
    max_bits: Any = (),
    exclude_lowrank_from_budget: bool = False,
    backend: str = "highs",
    warm_start: bool = True,
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> TableSweep:
    """Sweep budgets (a list or ``"2.25:4.5:0.05"``) over a profile table; see :func:`solve_table`."""
    if isinstance(budgets, str):
        budgets = parse_budgets(budgets)
    budgets = list(budgets)
    prep = _prepare(
        df, objective=objective, ties_patterns=ties_patterns, min_bits=min_bits,
        max_bits=max_bits, exclude_lowrank_from_budget=exclude_lowrank_from_budget,
    )
    a = prep.arrays
    solutions = sweep(
        prep.error, prep.bits, a.numel, budgets, ties=prep.ties, backend=backend,
        warm_start=warm_start, time_limit=time_limit, mip_gap=mip_gap, matrix_names=a.matrices,
    )
    finished = [_finish(prep, s) for s in solutions]
    hull = lagrange_hull(prep.error, prep.bits, a.numel, prep.ties, matrix_names=a.matrices)
    return TableSweep(
        budgets=budgets,
        solutions=[f[0] for f in finished],
        assignments=[f[1] for f in finished],
        hull=hull,
        extra=_extra(prep),
        extras=[f[2] for f in finished],
    )


def _nf_bits(config: str) -> str:
    try:
        return str(QuantConfig.from_name(config).bits)
    except ValueError:
        return "other"


def _params_by_bits(assignments: dict[str, str], numel: dict[str, float]) -> dict[str, float]:
    total = sum(numel.values())
    out: Counter[str] = Counter()
    for name, config in assignments.items():
        out[_nf_bits(config)] += numel[name] / total
    return dict(sorted(out.items()))


def allocation_dict(
    solution: Solution,
    assignments: dict[str, str],
    budget: float,
    profile_id: str,
    **extra: Any,
) -> dict[str, Any]:
    """The Allocation JSON dict: budget, achieved bits (everything counted), status, assignments.

    ``bits_per_param`` counts every stored bit (``solution.full_bits_per_param`` when set);
    ``budget_bits_per_param`` is what the budget constraint counted. ``bits_histogram``
    counts matrices per NF code width. ``extra`` entries are added (and win on clashes).
    """
    full = solution.full_bits_per_param
    out: dict[str, Any] = {
        "budget": float(budget),
        "bits_per_param": full if full is not None else solution.bits_per_param,
        "budget_bits_per_param": solution.bits_per_param,
        "objective": solution.objective,
        "bound": solution.bound,
        "status": solution.status,
        "gap": solution.gap,
        "seconds": solution.seconds,
        "backend": solution.backend,
        "profile": profile_id,
        "n_matrices": solution.n_matrices,
        "n_candidates": solution.n_candidates,
        "n_candidates_after_pruning": solution.n_candidates_after_pruning,
        "bits_histogram": dict(sorted(Counter(_nf_bits(c) for c in assignments.values()).items())),
        "note": solution.note,
        "assignments": dict(assignments),
    }
    out.update(extra)
    return json_ready(out)
