"""Exact solving: Lagrangian reduced-cost fixing, a core search for the incumbent, one MIP.

With the optimal Lagrangian price λ, every allocation costs at least ``L + Σ rc``, where
``L`` is the Lagrangian (LP) bound and ``rc_k = e_k + λ b_k - min over k's group`` ≥ 0.
So an allocation better than an incumbent of cost ``U`` only uses candidates with
``rc_k < U - L``: fixing the others to 0 is exact. A bounded dynamic program over those
candidates (:mod:`.core_dp`) finds, and usually proves, the optimum; the MIP backend
then solves the fixed-down model seeded with it, which certifies (or improves) it.
HiGHS runs that MIP with its primal heuristics off, as the incumbent is nearly always
optimal already (measured 3-10x faster on the 70B-shaped benchmark).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import numpy as np

from .core_dp import search_optimum
from .highs_backend import solve_highs
from .lagrange import LagrangeHull, LagrangeResult
from .options import SolveOptions
from .problem import CandidateProblem
from .pulp_backend import solve_pulp
from .solution import BackendResult
from .submodel import SubModel, build_submodel

log = logging.getLogger(__name__)

EXACT_BACKENDS = ("highs", "pulp-highs", "pulp-cbc")
#: States the core search may hold; beyond it, it keeps the best-bounded ones (heuristic).
CORE_SEARCH_STATES = 4000
#: Seconds the core search may take before the MIP takes over with the best found so far.
CORE_SEARCH_SECONDS = 1.0
#: Under a time limit, a MIP with more columns is not started: the answer is the core search's
#: best allocation (status time_limit). HiGHS presolves the root LP relaxation without checking
#: its time limit or callbacks (HPresolve::detectParallelRowsAndCols): measured, under load,
#: about 4 s at 20,000 columns (100 synthetic adapters) and over 8 minutes at 494,000 (1,000
#: adapters, with a 60 s limit), where building the MIP alone took 3.7 s.
LIMITED_MIP_COLUMNS = 50_000
#: How often an over-budget MIP answer (solver tolerances) is re-solved with a tighter row.
_REPAIR_TRIES = 3


def run_backend(
    backend: str,
    sub: SubModel,
    *,
    start: np.ndarray | None,
    time_limit: float | None,
    mip_gap: float,
    heuristics: bool = True,
) -> BackendResult:
    """Solve one MIP with the named exact backend (``heuristics`` only matters for highs)."""
    if backend == "highs":
        return solve_highs(sub, start=start, time_limit=time_limit, mip_gap=mip_gap, heuristics=heuristics)
    if backend in ("pulp-highs", "pulp-cbc"):
        return solve_pulp(sub, backend.split("-", 1)[1], start=start, time_limit=time_limit, mip_gap=mip_gap)
    raise ValueError(f"{backend!r} is not an exact backend; use one of {list(EXACT_BACKENDS)}")


def _run_within_budget(
    backend: str,
    problem: CandidateProblem,
    sub: SubModel,
    capacity: float,
    *,
    time_limit,
    **kwargs,
) -> BackendResult:
    """Run the MIP; should solver tolerances let its answer exceed the budget, tighten and rerun."""
    result = run_backend(backend, sub, time_limit=time_limit(), **kwargs)
    for _ in range(_REPAIR_TRIES):
        if result.pick is None or problem.pick_bits(result.pick) <= capacity:
            return result
        excess = problem.pick_bits(result.pick) - capacity
        log.info("%s exceeded the budget by %.3g bits (solver tolerance); re-solving tighter", backend, excess)
        sub = dataclasses.replace(sub, rhs=sub.rhs - (excess + 1e-9 * capacity) / problem.total_params)
        result = run_backend(backend, sub, time_limit=time_limit(), **kwargs)
    if result.pick is not None and problem.pick_bits(result.pick) > capacity:
        result = BackendResult(pick=None, status="failed", detail="answers kept exceeding the budget")
    return result


def reduced_costs(problem: CandidateProblem, price: float, capacity: float) -> tuple[np.ndarray, float]:
    """Reduced cost of every candidate at ``price`` and the Lagrangian bound L(price)."""
    score = problem.cand_error + price * problem.cand_bits
    best = np.minimum.reduceat(score, problem.start[:-1])
    rc = score - best[problem.cand_group]
    return rc, float(best.sum() - price * capacity)


def solve_exact(
    problem: CandidateProblem,
    hull: LagrangeHull,
    capacity: float,
    lagrange: LagrangeResult,
    options: SolveOptions,
    *,
    incumbent: np.ndarray,
) -> BackendResult:
    """Optimal (or, on a time limit, best found) pick at ``capacity`` bits.

    ``incumbent`` is a feasible pick; with ``options.warm_start`` the core search improves it
    and it seeds the MIP. ``options.core=False`` skips reduced-cost fixing and the core
    search: the MIP gets every (pruned) candidate. The returned bound is valid for the whole
    problem.
    """
    t0 = time.perf_counter()
    backend, warm_start, core = options.backend, options.warm_start, options.core
    time_limit, mip_gap = options.time_limit, options.mip_gap
    rc, bound_l = reduced_costs(problem, lagrange.price, capacity)
    floor = max(bound_l, lagrange.bound)
    best, proven = incumbent, False
    if warm_start and core:
        search_time = CORE_SEARCH_SECONDS if time_limit is None else min(CORE_SEARCH_SECONDS, 0.5 * time_limit)
        outcome = search_optimum(
            problem, hull, capacity, lagrange, rc, bound_l, incumbent,
            max_states=CORE_SEARCH_STATES, deadline=t0 + search_time,
        )
        best, proven, floor = outcome.pick, outcome.proven, max(floor, outcome.floor)
    best_err = problem.pick_error(best)
    timings = {"core_search": time.perf_counter() - t0}
    scale = abs(best_err) + lagrange.price * float(problem.cand_bits.max())

    def remaining() -> float | None:
        return None if time_limit is None else max(time_limit - (time.perf_counter() - t0), 1e-3)

    if core:
        keep = rc <= max(best_err - bound_l, 0.0) * (1 + 1e-9) + 1e-12 * scale
        keep[best] = True
    else:
        keep = np.ones(problem.n_candidates, dtype=bool)
    sub = build_submodel(problem, keep, capacity)
    if sub.n_cols == 0:
        fixed = sub.fixed_pick.copy()
        result = BackendResult(pick=fixed, status="optimal", bound=problem.pick_error(fixed))
    elif time_limit is not None and sub.n_cols > LIMITED_MIP_COLUMNS:
        detail = f"a MIP of {sub.n_cols} columns is not started under a time limit (over {LIMITED_MIP_COLUMNS})"
        log.info("%s: %s", backend, detail)
        result = BackendResult(pick=None, status="time_limit", detail=detail)
    else:
        result = _run_within_budget(
            backend, problem, sub, capacity, start=best if warm_start else None,
            time_limit=remaining, mip_gap=mip_gap, heuristics=not (core and warm_start),
        )
    timings.update(result.timings)
    log.debug(
        "%s: MIP over %d of %d candidates in %d groups (core search proven: %s) -> %s",
        backend, sub.n_cols, problem.n_candidates, sub.n_free, proven, result.detail or result.status,
    )
    before = best_err
    core_err = math.inf
    if result.pick is not None and problem.pick_bits(result.pick) <= capacity:
        core_err = problem.pick_error(result.pick)
        if core_err < best_err:
            if proven:
                log.warning("the MIP beat the core search's optimum by %.6g; keeping the MIP's", best_err - core_err)
            best, best_err = result.pick, core_err
    # Whole-problem bound: inside the MIP the solver's; outside it, no better than the incumbent.
    if result.status == "optimal" and (mip_gap == 0 or math.isnan(result.bound)) and math.isfinite(core_err):
        inside = core_err * (1 - mip_gap)
    else:
        inside = result.bound if not math.isnan(result.bound) else -math.inf
    bound = max(floor, min(inside, before))
    return BackendResult(
        pick=best, status=result.status, bound=min(bound, best_err), seconds=time.perf_counter() - t0,
        detail=result.detail, columns=sub.n_cols, rounds=1, timings=timings,
    )
