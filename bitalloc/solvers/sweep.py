"""``sweep``: an exact solve per budget on one prepared model, warm-started in budget order."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from .options import SolveOptions
from .problem import CandidateProblem, build_problem
from .solution import InfeasibleBudgetError, Solution
from .solve import solve_problem
from .specs import parse_budgets
from .validation import check_arrays, check_budget

log = logging.getLogger(__name__)


def sweep(
    error: Any,
    storage_bits: Any,
    numel: Any,
    budgets: Sequence[float] | str,
    *,
    ties: Sequence[Sequence[int]] | None = None,
    options: SolveOptions | None = None,
    matrix_names: Sequence[str] | None = None,
    progress: bool = False,
    **changes: Any,
) -> list[Solution]:
    """Solve at every budget (a list or a :func:`parse_budgets` string); one Solution each, in input order.

    Validation, pruning and the Lagrangian hull are built once; budgets are solved in
    increasing order, each warm-started from the best of the previous allocation and the
    Lagrangian one when ``options.warm_start``. A budget below the cheapest allocation gives
    a Solution with status "infeasible" (choice all -1, the minimum budget in ``note``).
    ``options.time_limit`` applies to each budget; otherwise as in :func:`solve`. ``progress``
    shows a bar in budgets.
    """
    options = SolveOptions.of(options, **changes)
    if isinstance(budgets, str):
        budgets = parse_budgets(budgets)
    budgets = [check_budget(b) for b in budgets]
    if not budgets:
        raise ValueError("sweep needs at least one budget")
    inputs = check_arrays(error, storage_bits, numel, ties, matrix_names)
    problem = build_problem(inputs, prune=options.prune)
    return sweep_problem(problem, budgets, options, progress=progress)


def sweep_problem(problem: CandidateProblem, budgets: Sequence[float], options: SolveOptions, *,
                  progress: bool = False) -> list[Solution]:
    """Sweep a prepared problem (see :func:`sweep`)."""
    previous: np.ndarray | None = None
    results: list[Solution | None] = [None] * len(budgets)
    order = sorted(range(len(budgets)), key=lambda j: budgets[j])
    for i in tqdm(order, desc="sweep", unit="budget", disable=not progress):
        t0 = time.perf_counter()
        budget = budgets[i]
        try:
            sol, pick = solve_problem(problem, budget, options, start=previous if options.warm_start else None)
        except InfeasibleBudgetError as exc:
            log.warning("sweep: %s", exc)
            results[i] = _infeasible(problem, budget, options.backend, exc, time.perf_counter() - t0)
            continue
        sol.seconds = time.perf_counter() - t0
        results[i] = sol
        previous = pick
    return [r for r in results if r is not None]


def _infeasible(
    problem: CandidateProblem, budget: float, backend: str, exc: InfeasibleBudgetError, seconds: float
) -> Solution:
    return Solution(
        choice=np.full(problem.inputs.n_matrices, -1, dtype=np.int64),
        objective=math.nan,
        bits_per_param=math.nan,
        status="infeasible",
        gap=math.nan,
        seconds=seconds,
        backend=backend,
        budget=budget,
        total_params=problem.total_params,
        n_matrices=problem.inputs.n_matrices,
        n_groups=problem.n_groups,
        n_candidates=problem.n_available,
        n_candidates_after_pruning=problem.n_candidates,
        note=str(exc),
    )
