"""Time limits are kept: HiGHS is interrupted on the wall clock, answers stay feasible and bounded."""

from __future__ import annotations

import time

import numpy as np
from solver_helpers import random_problem

from bitalloc.solvers import solve
from bitalloc.solvers.highs_backend import deadline_interrupt, new_highs, solve_highs
from bitalloc.solvers.problem import build_problem
from bitalloc.solvers.submodel import build_submodel
from bitalloc.solvers.validation import capacity_bits, check_arrays


def _hard_problem(n: int = 3000, seed: int = 5):
    error, bits, numel = random_problem(seed, n_matrices=n, n_configs=12)
    budget = float(np.nanmedian(bits / numel[:, None]))
    return error, bits, numel, budget


def test_a_past_deadline_interrupts_highs():
    import highspy

    error, bits, numel, budget = _hard_problem(400)
    problem = build_problem(check_arrays(error, bits, numel))
    keep = np.ones(problem.n_candidates, dtype=bool)
    sub = build_submodel(problem, keep, capacity_bits(budget, problem.total_params))
    result = solve_highs(sub, time_limit=1e-9)
    assert result.status == "time_limit"
    # the callback alone (no time_limit option) stops a solve that has started
    h = new_highs()
    h.setOptionValue("presolve", "off")
    n = 50
    h.addVars(n, np.zeros(n), np.ones(n))
    h.changeColsCost(n, np.arange(n, dtype=np.int32), -np.linspace(1.0, 2.0, n))
    h.addRow(-highspy.kHighsInf, 7.5, n, np.arange(n, dtype=np.int32), np.linspace(0.5, 1.5, n))
    h.changeColsIntegrality(n, np.arange(n, dtype=np.int32), np.array([highspy.HighsVarType.kInteger] * n))
    deadline_interrupt(h, time.perf_counter() - 1.0)
    h.run()
    assert h.getModelStatus() == highspy.HighsModelStatus.kInterrupt


def test_exact_solve_returns_by_the_limit_feasible_and_bounded():
    error, bits, numel, budget = _hard_problem()
    exact = solve(error, bits, numel, budget, backend="highs")
    limited = solve(error, bits, numel, budget, backend="highs", time_limit=1e-6)
    assert exact.status == "optimal"
    assert limited.status == "time_limit"
    assert limited.total_bits <= capacity_bits(budget, numel.sum())
    assert limited.bound <= exact.objective * (1 + 1e-9) <= limited.objective * (1 + 1e-9)
    assert limited.gap == (limited.objective - limited.bound) / limited.objective


def test_lagrange_gap_is_certified_and_within_one_step():
    error, bits, numel, budget = _hard_problem()
    lag = solve(error, bits, numel, budget, backend="lagrange")
    exact = solve(error, bits, numel, budget, backend="highs")
    assert lag.bound <= exact.objective * (1 + 1e-12) <= lag.objective * (1 + 1e-12)
    assert lag.gap == (lag.objective - lag.bound) / lag.objective
    # the hull greedy is within one matrix's largest error step of the LP bound
    step = np.nanmax(np.nanmax(error, axis=1) - np.nanmin(error, axis=1))
    assert lag.objective - lag.bound <= step


def test_a_large_mip_is_not_started_under_a_time_limit(monkeypatch):
    import bitalloc.solvers.exact as exact_module

    error, bits, numel, budget = _hard_problem(800)
    monkeypatch.setattr(exact_module, "LIMITED_MIP_COLUMNS", 10)
    limited = solve(error, bits, numel, budget, backend="highs", time_limit=3600.0)
    assert limited.status == "time_limit"
    assert limited.total_bits <= capacity_bits(budget, numel.sum())
    exact = solve(error, bits, numel, budget, backend="highs")  # no time limit: the MIP runs
    assert exact.status == "optimal"
    assert limited.bound <= exact.objective * (1 + 1e-9) <= limited.objective * (1 + 1e-9)
