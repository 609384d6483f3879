"""What the solvers return: a :class:`Solution`, a backend's raw answer, and the errors they raise."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitalloc.errors import InputError, UnavailableError

#: Note set when the budget exceeds the most expensive useful allocation.
ABOVE_MAX_NOTE = (
    "budget above the most expensive allocation; every matrix takes its least-error config"
)


class InfeasibleBudgetError(InputError):
    """The budget is below the cheapest allocation; ``min_budget`` is the least feasible one."""

    def __init__(self, budget: float, min_budget: float) -> None:
        self.budget = float(budget)
        self.min_budget = float(min_budget)
        # When 4 decimals round the minimum down, also say which 4-decimal budget works.
        rounded_up = math.ceil(self.min_budget * 1e4 - 1e-9) / 1e4
        hint = "" if f"{rounded_up:.4f}" == f"{self.min_budget:.4f}" else f"; use >= {rounded_up:.4f}"
        super().__init__(
            f"budget {self.budget:.4f} bits/param is infeasible: the minimum feasible budget "
            f"is {self.min_budget:.4f} bits/param (the cheapest config for every matrix{hint})"
        )


class SolverUnavailableError(UnavailableError):
    """A requested solver backend is not installed or cannot run here."""


@dataclass
class Solution:
    """One allocation: ``choice[m]`` is the column (config index) chosen for matrix ``m``.

    ``objective`` is Σ error of the choice, ``bound`` a proven lower bound on the optimum,
    ``gap`` = (objective - bound) / objective (0.0 when proven optimal). ``bits_per_param``
    is what the budget counts; ``full_bits_per_param`` (set by the profile layer) counts
    every stored bit when the budget leaves some out.
    """

    choice: np.ndarray
    objective: float
    bits_per_param: float
    status: str
    gap: float
    seconds: float
    backend: str
    budget: float = math.nan
    bound: float = math.nan
    total_bits: float = math.nan
    total_params: float = math.nan
    n_matrices: int = 0
    n_groups: int = 0
    n_candidates: int = 0
    n_candidates_after_pruning: int = 0
    n_candidates_active: int | None = None  # left for the exact search after reduced-cost fixing
    note: str = ""
    full_bits_per_param: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def optimal(self) -> bool:
        """True when the allocation is proven optimal."""
        return self.status == "optimal"

    @property
    def feasible(self) -> bool:
        """True when the solution holds an allocation (not an infeasible-budget marker)."""
        return self.status != "infeasible"

    def replace(self, **changes: Any) -> "Solution":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (NaN/inf become None, arrays become lists)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            out[f.name] = json_ready(getattr(self, f.name))
        return out


def json_ready(value: Any) -> Any:
    """Convert numpy scalars/arrays and non-finite floats into plain JSON values."""
    if isinstance(value, np.ndarray):
        return [json_ready(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    return value


@dataclass
class BackendResult:
    """Raw answer of a backend.

    ``pick``: one candidate index per group, or None when no allocation was found.
    ``status``: "optimal" (proven within the requested gap), "time_limit" or "failed".
    ``bound``: the solver's proven lower bound on the model, in error units (NaN if none).
    """

    pick: np.ndarray | None
    status: str
    bound: float = math.nan
    seconds: float = 0.0
    detail: str = ""
    columns: int = 0  # the most columns a MIP held
    rounds: int = 0  # MIPs solved
    timings: dict[str, float] = field(default_factory=dict)
