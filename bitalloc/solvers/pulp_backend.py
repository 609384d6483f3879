"""Exact MIP through PuLP, with HiGHS (highspy, else the ``highs`` binary) or bundled CBC.

Expressions are built from (variable, coefficient) pairs in one call each, never by
summing terms one at a time, so building stays linear in the number of columns.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import numpy as np

from .highs_backend import silence_banner, solver_threads
from .solution import BackendResult, SolverUnavailableError
from .submodel import SubModel

log = logging.getLogger(__name__)


def _pulp():
    try:
        import pulp
    except ImportError as exc:  # pragma: no cover - pulp is a dependency
        raise SolverUnavailableError("the pulp backends need PuLP: pip install pulp") from exc
    return pulp


def pulp_solver(solver: str, *, time_limit: float | None = None, mip_gap: float = 0.0, warm_start: bool = False) -> Any:
    """A configured PuLP solver for ``"highs"`` or ``"cbc"``; raises SolverUnavailableError if absent."""
    pulp = _pulp()
    gap_abs = 0.0 if mip_gap == 0 else None
    if solver == "cbc":
        cbc = pulp.PULP_CBC_CMD(
            msg=False, timeLimit=time_limit, gapRel=mip_gap, gapAbs=gap_abs, warmStart=warm_start,
            options=["primalT 1e-9", "integerT 1e-9"],
        )
        if not cbc.available():
            raise SolverUnavailableError("backend 'pulp-cbc': PuLP's bundled CBC binary is not available here")
        return cbc
    if solver == "highs":
        api = getattr(pulp, "HiGHS", None)
        if api is not None and api().available():
            silence_banner()
            return api(
                msg=False, timeLimit=time_limit, gapRel=mip_gap, gapAbs=gap_abs, threads=solver_threads(),
                random_seed=0, mip_feasibility_tolerance=1e-9, primal_feasibility_tolerance=1e-9,
            )
        cmd = getattr(pulp, "HiGHS_CMD", None)
        if cmd is not None and cmd().available():
            return cmd(msg=False, timeLimit=time_limit, gapRel=mip_gap, gapAbs=gap_abs)
        raise SolverUnavailableError(
            "backend 'pulp-highs' needs HiGHS for PuLP: install highspy (pip install highspy) "
            "or put the 'highs' executable on PATH; or use backend 'highs' or 'pulp-cbc'"
        )
    raise ValueError(f"unknown PuLP solver {solver!r}; use 'highs' or 'cbc'")


def solve_pulp(
    sub: SubModel,
    solver: str,
    *,
    start: np.ndarray | None = None,
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> BackendResult:
    """Solve a core MIP with PuLP and ``solver`` ("highs" or "cbc"); CBC takes ``start``."""
    pulp = _pulp()
    t0 = time.perf_counter()
    x0 = sub.columns_of(start) if solver == "cbc" else None
    backend = pulp_solver(solver, time_limit=time_limit, mip_gap=mip_gap, warm_start=x0 is not None)
    width = len(str(max(sub.n_cols - 1, 0)))
    xs = [pulp.LpVariable(f"x{j:0{width}d}", cat=pulp.LpBinary) for j in range(sub.n_cols)]
    prob = pulp.LpProblem("bitalloc", pulp.LpMinimize)
    prob.setObjective(pulp.LpAffineExpression(list(zip(xs, sub.cost.tolist()))))
    starts = sub.starts().tolist()
    gwidth = len(str(max(sub.n_free - 1, 0)))
    for g in range(sub.n_free):
        row = pulp.LpAffineExpression([(xs[j], 1.0) for j in range(starts[g], starts[g + 1])])
        prob.addConstraint(pulp.LpConstraint(row, sense=pulp.LpConstraintEQ, rhs=1.0), f"one_{g:0{gwidth}d}")
    budget = pulp.LpAffineExpression(list(zip(xs, sub.weight.tolist())))
    prob.addConstraint(pulp.LpConstraint(budget, sense=pulp.LpConstraintLE, rhs=sub.rhs), "budget")
    if x0 is not None:
        for x, v in zip(xs, x0.tolist()):
            x.setInitialValue(int(v))
    build = time.perf_counter() - t0
    prob.solve(backend)
    seconds = time.perf_counter() - t0

    values = np.array([x.varValue if x.varValue is not None else math.nan for x in xs])
    found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
    pick = sub.pick_from_values(values) if found and np.isfinite(values).all() else None
    bound = math.nan
    highs = getattr(prob, "solverModel", None)
    if solver == "highs" and highs is not None and hasattr(highs, "getInfo"):
        value = float(highs.getInfo().mip_dual_bound)
        if math.isfinite(value):
            bound = sub.to_original(value + sub.offset)
    if prob.sol_status == pulp.LpSolutionOptimal:
        status = "optimal"
    elif prob.sol_status == pulp.LpSolutionIntegerFeasible:
        status = "time_limit"
    else:
        status = "failed"
    detail = f"{pulp.LpStatus[prob.status]} / {pulp.LpSolution[prob.sol_status]}"
    log.debug("pulp-%s: %d columns, %s in %.3fs", solver, sub.n_cols, detail, seconds)
    return BackendResult(
        pick=pick, status=status, bound=bound, seconds=seconds, detail=detail,
        timings={"model_build": build, "solver": seconds - build},
    )
