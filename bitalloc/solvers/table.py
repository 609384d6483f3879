"""Profile tables to solver arrays, and solve/sweep/allocation helpers at that level.

A profile table has one row per (matrix, config) with at least the columns ``matrix``,
``rows``, ``cols``, ``config``, ``storage_bits``, ``error`` and ``error_fisher``. These
helpers turn it into the M x C arrays the solvers take, apply ties and bit bounds by
name, and build the Allocation JSON dict. Pure pandas/numpy; no torch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd

from ..configs import QuantConfig
from .lagrange import lagrange_hull
from .options import SolveOptions
from .solution import Solution, json_ready
from .solve import solve
from .specs import Bound, apply_bit_bounds, parse_bounds, parse_budgets, tie_groups
from .sweep import sweep

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("matrix", "rows", "cols", "config", "storage_bits")
#: Objective names and the profile columns they read.
OBJECTIVE_COLUMNS = {"plain": "error", "fisher": "error_fisher", "act": "error_act", "kl": "error_kl"}
#: What adds each optional column to a profile (for the message when it is missing).
COLUMN_SOURCES = {
    "error_fisher": "a Fisher estimate (profile without --no-fisher)",
    "error_act": "the calibration inputs' second moments (profile without --no-act)",
    "error_kl": "the per-matrix KL factors (profile without --no-kl)",
}


class MissingObjectiveError(ValueError):
    """The objective asks for a profile column the profile lacks (or holds only NaN in)."""

    def __init__(self, objective: str, column: str, message: str) -> None:
        super().__init__(message)
        self.objective, self.column = objective, column


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
        """Parameters per matrix (M,)."""
        return (self.rows * self.cols).astype(np.float64)


def _objective_column(df: pd.DataFrame, objective: str) -> str:
    column = OBJECTIVE_COLUMNS.get(objective, objective)
    values = pd.to_numeric(df[column], errors="coerce") if column in df.columns else None
    if values is None or values.isna().all():
        have = available_objectives(df)
        if column in COLUMN_SOURCES:
            raise MissingObjectiveError(
                objective, column,
                f"objective {objective!r} needs the column {column}, which this profile lacks (it needs "
                f"{COLUMN_SOURCES[column]}); this profile solves with {', '.join(have) or 'no objective'}. Rerun the "
                "`bitalloc profile` command that made it, with the same --out and without --no-fisher/--no-act/--no-kl: "
                "it resumes and adds the column")
        known = sorted(set(OBJECTIVE_COLUMNS) | {c for c in df.columns if str(c).startswith("error")})
        if values is None:
            raise ValueError(f"objective {objective!r}: the profile has no column {column!r}; use one of {known}")
        raise ValueError(f"objective {objective!r}: column {column!r} is all NaN")
    if values.isna().any():
        bad = df.loc[values.isna(), "matrix"].iloc[0]
        log.warning("objective %r: column %s is NaN for some rows (e.g. matrix %s): those configs are left out",
                    objective, column, bad)
    return column


def available_objectives(df: pd.DataFrame) -> list[str]:
    """The objective names (of :data:`OBJECTIVE_COLUMNS`) whose column this profile table holds values in."""
    return [name for name, column in OBJECTIVE_COLUMNS.items()
            if column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any()]


def profile_arrays(
    df: pd.DataFrame, *, objective: str = "fisher", exclude_lowrank_from_budget: bool = False
) -> ProfileArrays:
    """Pivot a profile table into arrays; matrices and configs keep their first-seen order.

    ``objective``: "plain" (column ``error``), "fisher" (``error_fisher``), "act"
    (``error_act``), "kl" (``error_kl``) or a column name.
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
                    parsed[c] = QuantConfig.from_name(configs[c], allow_unusual=True)
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


def default_objective(df: pd.DataFrame) -> str:
    """The best-measured objective the profile has: ``kl``, else ``fisher``, else ``plain``.

    ``reports/objective_fidelity/`` ranks them: ``kl`` and ``fisher`` predict measured KL about
    equally (Spearman 0.987 and 0.983), ``kl`` losing half as much at 2.5 bits/param; ``act``
    alone is never the default (0.709).
    """
    for objective in ("kl", "fisher"):
        column = OBJECTIVE_COLUMNS[objective]
        if column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any():
            return objective
    return "plain"


@dataclass(frozen=True)
class TableSolution:
    """One budget solved on a profile table: the Solution, named, with what the table adds.

    ``assignments`` maps matrix names to config names (empty when the budget is
    infeasible); ``tie_groups`` lists the tied matrix names; ``min_bits`` / ``max_bits`` are
    the parsed ``(regex, bits)`` bounds; ``params_by_bits`` is the share of parameters per
    NF code width (None when infeasible). :meth:`to_dict` is the allocation JSON dict.
    """

    budget: float
    solution: Solution
    assignments: dict[str, str]
    objective_column: str
    exclude_lowrank_from_budget: bool
    n_configs: int
    total_params: int
    tie_groups: list[list[str]]
    min_bits: list[Bound]
    max_bits: list[Bound]
    params_by_bits: dict[str, float] | None = None

    def to_dict(self, profile_id: str) -> dict[str, Any]:
        """The allocation JSON dict of this answer (see :func:`allocation_dict`)."""
        extra: dict[str, Any] = {
            "objective_column": self.objective_column,
            "exclude_lowrank_from_budget": self.exclude_lowrank_from_budget,
            "n_configs": self.n_configs,
            "total_params": self.total_params,
            "ties": self.tie_groups,
            "min_bits": [list(b) for b in self.min_bits],
            "max_bits": [list(b) for b in self.max_bits],
        }
        if self.params_by_bits is not None:
            extra["params_by_bits"] = self.params_by_bits
        return allocation_dict(self.solution, self.assignments, self.budget, profile_id, **extra)


@dataclass(frozen=True)
class TableProblem:
    """A profile table as the solver's arrays, with ties and bit bounds applied by name."""

    arrays: ProfileArrays
    error: np.ndarray  # (M, C) the objective, NaN outside the bounds
    bits: np.ndarray  # (M, C) the bits the budget counts, NaN outside the bounds
    ties: list[list[int]]
    min_bits: list[Bound]
    max_bits: list[Bound]

    @staticmethod
    def check_objective(df: pd.DataFrame, objective: str) -> str:
        """The column ``objective`` reads in ``df``; MissingObjectiveError (a ValueError) when the
        profile lacks it, naming what adds it."""
        return _objective_column(df, objective)

    @classmethod
    def build(cls, df: pd.DataFrame, options: SolveOptions) -> TableProblem:
        """Pivot ``df`` with ``options``' objective, budget convention, ties and bounds."""
        objective = options.objective or default_objective(df)
        arrays = profile_arrays(
            df, objective=objective, exclude_lowrank_from_budget=options.exclude_lowrank_from_budget
        )
        ties = tie_groups(arrays.matrices, options.ties) if options.ties else []
        floors, ceilings = parse_bounds(options.min_bits), parse_bounds(options.max_bits)
        error, bits = arrays.error, arrays.budget_bits
        if floors or ceilings:
            allowed = apply_bit_bounds(bits / arrays.numel[:, None], arrays.matrices, floors, ceilings)
            error = np.where(allowed, error, np.nan)
            bits = np.where(allowed, bits, np.nan)
        return cls(arrays, error, bits, ties, floors, ceilings)

    def named(self, budget: float, sol: Solution) -> TableSolution:
        """``sol`` with names, every stored bit counted (``sol.full_bits_per_param`` is set)."""
        a = self.arrays
        assignments: dict[str, str] = {}
        params_by_bits = None
        if sol.feasible:
            rows = np.arange(len(a.matrices))
            sol.full_bits_per_param = float(a.storage_bits[rows, sol.choice].sum()) / float(a.numel.sum())
            assignments = {a.matrices[m]: a.configs[c] for m, c in enumerate(sol.choice.tolist())}
            params_by_bits = _params_by_bits(assignments, dict(zip(a.matrices, a.numel.tolist())))
        return TableSolution(
            budget=float(budget),
            solution=sol,
            assignments=assignments,
            objective_column=a.objective_column,
            exclude_lowrank_from_budget=a.exclude_lowrank_from_budget,
            n_configs=len(a.configs),
            total_params=int(a.numel.sum()),
            tie_groups=[[a.matrices[m] for m in tie] for tie in self.ties],
            min_bits=list(self.min_bits),
            max_bits=list(self.max_bits),
            params_by_bits=params_by_bits,
        )


def solve_table(
    df: pd.DataFrame, budget: float, options: SolveOptions | None = None, **changes: Any
) -> TableSolution:
    """Solve a profile table at ``budget`` bits/param with ``options`` (``changes`` applied).

    The answer's ``solution.full_bits_per_param`` counts every stored bit; its
    ``to_dict(profile_id)`` is the allocation JSON dict.
    """
    options = SolveOptions.of(options, **changes)
    problem = TableProblem.build(df, options)
    a = problem.arrays
    sol = solve(problem.error, problem.bits, a.numel, budget, ties=problem.ties, options=options,
                matrix_names=a.matrices)
    return problem.named(budget, sol)


@dataclass
class TableSweep:
    """The answer of :func:`sweep_table`: one :class:`TableSolution` per budget, plus the hull."""

    results: list[TableSolution]
    hull: pd.DataFrame

    @property
    def budgets(self) -> list[float]:
        """The budgets, in the order given."""
        return [r.budget for r in self.results]

    @property
    def solutions(self) -> list[Solution]:
        """One Solution per budget."""
        return [r.solution for r in self.results]

    @property
    def assignments(self) -> list[dict[str, str]]:
        """One ``{matrix: config}`` per budget (empty where infeasible)."""
        return [r.assignments for r in self.results]

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
        return [r.to_dict(profile_id) for r in self.results]


def sweep_table(
    df: pd.DataFrame, budgets: Sequence[float] | str, options: SolveOptions | None = None, *,
    progress: bool = False, **changes: Any
) -> TableSweep:
    """Sweep budgets (a list or ``"2.25:4.5:0.05"``) over a profile table; see :func:`solve_table`
    (``progress``: a bar in budgets)."""
    options = SolveOptions.of(options, **changes)
    if isinstance(budgets, str):
        budgets = parse_budgets(budgets)
    budgets = list(budgets)
    problem = TableProblem.build(df, options)
    a = problem.arrays
    solutions = sweep(problem.error, problem.bits, a.numel, budgets, ties=problem.ties, options=options,
                      matrix_names=a.matrices, progress=progress)
    hull = lagrange_hull(problem.error, problem.bits, a.numel, problem.ties, matrix_names=a.matrices)
    return TableSweep([problem.named(b, s) for b, s in zip(budgets, solutions)], hull)


def _nf_bits(config: str) -> str:
    try:
        return str(QuantConfig.from_name(config, allow_unusual=True).bits)
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
