"""Bit allocation solvers: choose one config per matrix under a bits-per-parameter budget.

Minimize Σ_m error[m, c_m] subject to Σ_m storage_bits[m, c_m] ≤ budget · Σ_m numel_m,
with optional ties (matrices that must share a config) and per-matrix bit floors/ceilings.
Dominance pruning runs first (lossless). Exact backends (HiGHS through its array API, the
default; PuLP with HiGHS or CBC) solve the MIP after exact Lagrangian reduced-cost fixing,
seeded by a bounded dynamic-programming core search; ``lagrange`` gives the convex-hull
allocation with its LP bound. One frozen :class:`SolveOptions` carries every setting.
The solvers see arrays; :func:`solve_table` / :func:`sweep_table` turn a profile table into
them. Never imports torch.
"""

from __future__ import annotations

from .lagrange import lagrange_hull
from .options import SolveOptions
from .pruning import prune_dominated
from .solution import InfeasibleBudgetError, Solution, SolverUnavailableError
from .solve import solve
from .specs import FUSE_PRESET, apply_bit_bounds, parse_bounds, parse_budgets, tie_groups
from .sweep import sweep
from .table import (
    OBJECTIVE_COLUMNS,
    MissingObjectiveError,
    ProfileArrays,
    TableProblem,
    TableSolution,
    TableSweep,
    allocation_dict,
    available_objectives,
    default_objective,
    profile_arrays,
    solve_table,
    sweep_table,
)
from .validation import BACKENDS

__all__ = [
    "BACKENDS",
    "FUSE_PRESET",
    "InfeasibleBudgetError",
    "MissingObjectiveError",
    "OBJECTIVE_COLUMNS",
    "ProfileArrays",
    "Solution",
    "SolveOptions",
    "SolverUnavailableError",
    "TableProblem",
    "TableSolution",
    "TableSweep",
    "allocation_dict",
    "available_objectives",
    "apply_bit_bounds",
    "default_objective",
    "lagrange_hull",
    "parse_bounds",
    "parse_budgets",
    "profile_arrays",
    "prune_dominated",
    "solve",
    "solve_table",
    "sweep",
    "sweep_table",
    "tie_groups",
]
