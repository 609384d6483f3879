"""``solve``: one budget, any backend, with validation, pruning and honest status."""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Sequence

import numpy as np

from .exact import solve_exact
from .lagrange import LagrangeHull
from .options import SolveOptions
from .problem import CandidateProblem, build_problem
from .solution import ABOVE_MAX_NOTE, InfeasibleBudgetError, Solution
from .validation import capacity_bits, check_arrays, check_budget

log = logging.getLogger(__name__)

#: Relative gap under which an answer counts as optimal.
OPTIMAL_RTOL = 1e-9


def solve(
    error: Any,
    storage_bits: Any,
    numel: Any,
    budget: float,
    *,
    ties: Sequence[Sequence[int]] | None = None,
    options: SolveOptions | None = None,
    matrix_names: Sequence[str] | None = None,
    **changes: Any,
) -> Solution:
    """Choose one config per matrix minimizing Σ error under ``budget`` bits per parameter.

    ``error`` and ``storage_bits`` are M x C (NaN/inf = config unavailable), ``numel`` the
    parameter count of each matrix, ``ties`` groups of matrix indices that must take the
    same column. ``options`` (a :class:`SolveOptions`, with ``changes`` applied, e.g.
    ``backend="pulp-cbc"``) sets the backend: "highs" (default), "pulp-highs", "pulp-cbc"
    (exact MIPs), or "lagrange" (hull greedy with a lower bound); its time limit, gap and
    ``warm_start``/``prune``/``core`` switches. ``matrix_names`` only improve error messages.
    Raises :class:`InfeasibleBudgetError` below the cheapest allocation, ValueError on bad input.
    """
    t0 = time.perf_counter()
    options = SolveOptions.of(options, **changes)
    budget = check_budget(budget)
    inputs = check_arrays(error, storage_bits, numel, ties, matrix_names)
    problem = build_problem(inputs, prune=options.prune)
    t_prepared = time.perf_counter()
    solution, _ = solve_problem(problem, budget, options)
    solution.seconds = time.perf_counter() - t0
    solution.timings["prepare"] = t_prepared - t0
    solution.timings["total"] = solution.seconds
    return solution


def solve_problem(
    problem: CandidateProblem,
    budget: float,
    options: SolveOptions,
    *,
    start: np.ndarray | None = None,
) -> tuple[Solution, np.ndarray]:
    """Solve a prepared problem at one budget; returns the solution and its per-group pick.

    ``start`` is a per-group pick (e.g. the previous budget's) used as incumbent if it fits.
    """
    t0 = time.perf_counter()
    backend = options.backend
    params = problem.total_params
    capacity = capacity_bits(budget, params)
    min_bits = problem.pick_bits(problem.cheapest_pick)
    if min_bits > capacity:
        raise InfeasibleBudgetError(budget, min_bits / params)

    best = problem.least_error_pick
    if problem.pick_bits(best) <= capacity:
        log.info("budget %.4f: %s", budget, ABOVE_MAX_NOTE)
        sol = _make_solution(problem, best, budget, backend, "optimal", problem.pick_error(best), t0)
        sol.note = ABOVE_MAX_NOTE
        return sol, best

    hull = problem.cache.get("hull")
    if hull is None:
        hull = problem.cache["hull"] = LagrangeHull(problem)
    t_hull = time.perf_counter()
    heuristic = hull.solve(capacity)
    timings = {"lagrange": time.perf_counter() - t_hull}
    incumbent = heuristic.pick
    if start is not None and problem.pick_bits(start) <= capacity:
        if problem.pick_error(start) < problem.pick_error(incumbent):
            incumbent = start
    objective = problem.pick_error(incumbent)

    if backend == "lagrange" or (options.core and _gap(objective, heuristic.bound) <= OPTIMAL_RTOL * 1e-3):
        # The lagrange backend stops here; so does any backend when the bound is met.
        status = "optimal" if _gap(objective, heuristic.bound) <= OPTIMAL_RTOL else "feasible"
        sol = _make_solution(problem, incumbent, budget, backend, status, heuristic.bound, t0)
        sol.timings.update(timings)
        if backend == "lagrange":
            sol.note = f"Lagrangian price at the budget: {heuristic.price:.6g} error/bit"
        else:
            sol.note = "the Lagrangian allocation meets the LP bound: optimal without a MIP"
        return sol, incumbent

    result = solve_exact(problem, hull, capacity, heuristic, options, incumbent=incumbent)
    pick, status, note = result.pick, result.status, ""
    if pick is None:
        pick, status = incumbent, "failed"
        note = f"{backend} returned no allocation ({result.detail}); using the Lagrangian allocation"
        log.warning("budget %.4f: %s", budget, note)
    bound = heuristic.bound if math.isnan(result.bound) else max(result.bound, heuristic.bound)
    objective = problem.pick_error(pick)
    if status == "optimal" and _gap(objective, bound) > OPTIMAL_RTOL:
        status = "gap_limit"  # proven only within the requested mip_gap
    sol = _make_solution(problem, pick, budget, backend, status, min(bound, objective), t0)
    sol.timings.update(timings)
    sol.timings.update(result.timings)
    sol.n_candidates_active = result.columns
    sol.note = note
    return sol, pick


def _gap(objective: float, bound: float) -> float:
    if math.isnan(bound):
        return math.inf
    if objective == 0:
        return 0.0 if bound >= 0 else math.inf
    return max(0.0, (objective - bound) / abs(objective))


def _make_solution(
    problem: CandidateProblem,
    pick: np.ndarray,
    budget: float,
    backend: str,
    status: str,
    bound: float,
    t0: float,
) -> Solution:
    inputs = problem.inputs
    choice = problem.choice_from_pick(pick)
    rows = np.arange(inputs.n_matrices)
    objective = float(inputs.error[rows, choice].sum())
    total_bits = float(inputs.bits[rows, choice].sum())
    params = problem.total_params
    optimal = status == "optimal"
    seconds = time.perf_counter() - t0
    return Solution(
        choice=choice,
        objective=objective,
        bits_per_param=total_bits / params,
        status=status,
        gap=0.0 if optimal else _gap(objective, bound),
        seconds=seconds,
        backend=backend,
        budget=budget,
        bound=objective if optimal else float(bound),
        total_bits=total_bits,
        total_params=params,
        n_matrices=inputs.n_matrices,
        n_groups=problem.n_groups,
        n_candidates=problem.n_available,
        n_candidates_after_pruning=problem.n_candidates,
        timings={"solve": seconds},
    )
