"""Exceptions raised by the solvers."""

from __future__ import annotations

import math


class InfeasibleBudgetError(ValueError):
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


class SolverUnavailableError(RuntimeError):
    """A requested solver backend is not installed or cannot run here."""
