"""Exact MIP through HiGHS's array API: the whole model is passed in one call.

Binary column per core candidate, one assignment row per free group (``Σ x = 1``), one
knapsack row (``Σ bits/params · x ≤ budget``), integrality set through the model's
integrality array. Deterministic: fixed random seed and thread count.

Time limits: HiGHS checks its ``time_limit`` option only between some phases, so on large
models it overruns it (measured on a 1,000-adapter fleet: 669 s of HiGHS under a 108 s
limit; on 100 adapters, 6.0 s of MIP presolve alone under a 6.3 s limit, then 3.2 s more
at the root node). With a time limit, :func:`solve_highs` therefore also interrupts HiGHS
from its simplex, IPM and MIP callbacks once the wall-clock deadline passes, and turns MIP
presolve off, which checks neither the limit nor the callbacks.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

from .solution import BackendResult, SolverUnavailableError
from .submodel import SubModel

log = logging.getLogger(__name__)
_BANNER_SHOWN = False

#: HiGHS settings when the incumbent given is believed optimal and the MIP only has to
#: prove it: primal heuristics, restarts and symmetry detection then cost far more time
#: than they save on these small multiple-choice knapsacks (measured 3-5x on the 70B-shaped
#: benchmark's cores). Without a trusted incumbent HiGHS keeps its defaults.
PROOF_OPTIONS = {
    "mip_heuristic_effort": 0.0,
    "mip_heuristic_run_rins": False,
    "mip_heuristic_run_rens": False,
    "mip_heuristic_run_feasibility_jump": False,
    "mip_heuristic_run_root_reduced_cost": False,
    "mip_allow_restart": False,
    "mip_detect_symmetry": False,
}


def solver_threads() -> int:
    """Threads for HiGHS: at most 2 (the core MIPs are small; more threads only add overhead)."""
    return max(1, min(os.cpu_count() or 1, 2))


def _highspy():
    try:
        import highspy
    except ImportError as exc:  # pragma: no cover - highspy is a dependency
        raise SolverUnavailableError("backend 'highs' needs highspy: pip install highspy") from exc
    return highspy


@contextlib.contextmanager
def _quiet_stdout():
    """Silence C-level stdout (HiGHS prints a banner when the first instance is created)."""
    try:
        sys.stdout.flush()
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved = os.dup(fd)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), fd)
            yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


def silence_banner() -> None:
    """Create the process's first HiGHS instance with stdout muted (it prints a banner)."""
    global _BANNER_SHOWN
    if not _BANNER_SHOWN:
        with _quiet_stdout():
            _highspy().Highs()
        _BANNER_SHOWN = True


def new_highs() -> Any:
    """A silent ``highspy.Highs`` with deterministic options."""
    silence_banner()
    h = _highspy().Highs()
    h.setOptionValue("output_flag", False)
    h.setOptionValue("threads", solver_threads())
    h.setOptionValue("random_seed", 0)
    # Tight tolerances: looser ones let answers exceed the budget by rounding.
    h.setOptionValue("mip_feasibility_tolerance", 1e-9)
    h.setOptionValue("primal_feasibility_tolerance", 1e-9)
    return h


def deadline_interrupt(h: Any, deadline: float) -> None:
    """Make HiGHS stop (status interrupt) at the first simplex, IPM or MIP callback after
    ``deadline`` (a ``time.perf_counter`` value)."""

    def check(event: Any) -> None:
        if time.perf_counter() >= deadline:
            event.interrupt()

    h.cbSimplexInterrupt += check
    h.cbIpmInterrupt += check
    h.cbMipInterrupt += check


def solve_highs(
    sub: SubModel,
    *,
    start: np.ndarray | None = None,
    time_limit: float | None = None,
    mip_gap: float = 0.0,
    heuristics: bool = True,
) -> BackendResult:
    """Solve a core MIP with HiGHS; ``start`` is a per-group pick to warm-start from.

    ``heuristics=False`` applies :data:`PROOF_OPTIONS`, for when ``start`` is believed optimal.
    ``time_limit`` (seconds from this call) is kept on the wall clock (see the module docstring).
    """
    hs = _highspy()
    t0 = time.perf_counter()
    n, f = sub.n_cols, sub.n_free
    lp = hs.HighsLp()
    lp.num_col_ = n
    lp.num_row_ = f + 1
    lp.offset_ = sub.offset
    lp.col_cost_ = sub.cost
    lp.col_lower_ = np.zeros(n)
    lp.col_upper_ = np.ones(n)
    lp.row_lower_ = np.concatenate([np.ones(f), [-hs.kHighsInf]])
    lp.row_upper_ = np.concatenate([np.ones(f), [sub.rhs]])
    # Column-wise: column j has a 1 in its group's row and its bits/param in the budget row.
    lp.a_matrix_.format_ = hs.MatrixFormat.kColwise
    lp.a_matrix_.num_col_ = n
    lp.a_matrix_.num_row_ = f + 1
    lp.a_matrix_.start_ = np.arange(0, 2 * n + 1, 2, dtype=np.int32)
    index = np.empty(2 * n, dtype=np.int32)
    index[0::2] = sub.col_group
    index[1::2] = f
    value = np.empty(2 * n)
    value[0::2] = 1.0
    value[1::2] = sub.weight
    lp.a_matrix_.index_ = index
    lp.a_matrix_.value_ = value
    lp.integrality_ = [hs.HighsVarType.kInteger] * n

    h = new_highs()
    if not heuristics:
        for option, value in PROOF_OPTIONS.items():
            h.setOptionValue(option, value)
    h.setOptionValue("time_limit", float(time_limit) if time_limit else math.inf)
    if time_limit:
        h.setOptionValue("presolve", "off")
        deadline_interrupt(h, t0 + float(time_limit))
    h.setOptionValue("mip_rel_gap", float(mip_gap))
    h.setOptionValue("mip_abs_gap", 0.0 if mip_gap == 0 else 1e-6)
    if h.passModel(lp) != hs.HighsStatus.kOk:
        raise RuntimeError("HiGHS refused the model")
    x0 = sub.columns_of(start)
    if x0 is not None:
        sol = hs.HighsSolution()
        sol.col_value = x0
        h.setSolution(sol)
    build = time.perf_counter() - t0
    h.run()
    seconds = time.perf_counter() - t0
    model_status = h.getModelStatus()
    info = h.getInfo()
    pick = None
    if info.primal_solution_status == hs.kSolutionStatusFeasible:
        pick = sub.pick_from_values(np.asarray(h.getSolution().col_value))
    if model_status == hs.HighsModelStatus.kOptimal:
        status = "optimal"
    elif model_status in (hs.HighsModelStatus.kTimeLimit, hs.HighsModelStatus.kInterrupt):
        status = "time_limit"
    else:
        status = "failed"
    bound = float(info.mip_dual_bound)
    bound = sub.to_original(bound) if math.isfinite(bound) else math.nan
    detail = h.modelStatusToString(model_status)
    log.debug("HiGHS: %d columns, %s in %.3fs", n, detail, seconds)
    return BackendResult(
        pick=pick, status=status, bound=bound, seconds=seconds, detail=detail,
        timings={"model_build": build, "solver": seconds - build},
    )
