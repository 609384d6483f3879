"""Bad input fails early with a clear ValueError; budget extremes behave."""

from __future__ import annotations

import math

import numpy as np
import pytest
from solver_helpers import random_problem

from bitalloc.solvers import InfeasibleBudgetError, solve, sweep
from bitalloc.solvers.solution import ABOVE_MAX_NOTE


@pytest.fixture
def small():
    return random_problem(0)


def test_nan_only_rows_are_named(small):
    error, bits, numel = small
    error[2] = np.nan
    bits[4, :] = np.inf
    with pytest.raises(ValueError, match=r"matrices \[2, 4\] have no available config"):
        solve(error, bits, numel, 4.0)


def test_names_appear_in_messages(small):
    error, bits, numel = small
    error[1] = np.nan
    names = [f"layer{i}" for i in range(6)]
    with pytest.raises(ValueError, match="layer1"):
        solve(error, bits, numel, 4.0, matrix_names=names)


def test_tied_group_without_a_common_config(small):
    error, bits, numel = small
    error[0, :] = np.nan
    error[0, 0] = 1.0
    error[1, 0] = np.nan
    with pytest.raises(ValueError, match="share no available config"):
        solve(error, bits, numel, 4.0, ties=[[0, 1]])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda e, b, n: (e[:, :3], b, n), "same shape"),
        (lambda e, b, n: (e, b, n[:4]), "one entry per matrix"),
        (lambda e, b, n: (e[:0], b[:0], n[:0]), "no matrices"),
        (lambda e, b, n: (e[:, :0], b[:, :0], n), "no configs"),
        (lambda e, b, n: (e[0], b[0], n), "2-D"),
        (lambda e, b, n: (e, b, np.where(np.arange(6) == 3, 0.0, n)), "numel must be positive"),
        (lambda e, b, n: (e, b, np.where(np.arange(6) == 3, np.nan, n)), "numel must be positive"),
        (lambda e, b, n: (-e, b, n), "errors must be >= 0"),
        (lambda e, b, n: (e, -b, n), "storage_bits must be >= 0"),
        (lambda e, b, n: (np.full(e.shape, "x"), b, n), "numeric"),
    ],
)
def test_bad_arrays(small, change, message):
    error, bits, numel = change(*small)
    with pytest.raises(ValueError, match=message):
        solve(error, bits, numel, 4.0)


@pytest.mark.parametrize("budget", [-1.0, 0.0, math.nan, math.inf, "3", None, True])
def test_bad_budgets(small, budget):
    with pytest.raises(ValueError, match="budget must be"):
        solve(*small, budget)


@pytest.mark.parametrize(
    "ties, message",
    [
        ([[0, 6]], "out of range"),
        ([[0, -1]], "out of range"),
        ([[0, 1], [1, 2]], "in two ties"),
        ([[0, 1.5]], "must be ints"),
        ("0,1", "list of lists"),
        ([3], "must be a list"),
    ],
)
def test_bad_ties(small, ties, message):
    with pytest.raises(ValueError, match=message):
        solve(*small, 4.0, ties=ties)


def test_unknown_backend_and_options(small):
    with pytest.raises(ValueError, match="unknown solver backend 'gurobi'"):
        solve(*small, 4.0, backend="gurobi")
    with pytest.raises(ValueError, match="time_limit"):
        solve(*small, 4.0, time_limit=-1)
    with pytest.raises(ValueError, match="mip_gap"):
        solve(*small, 4.0, mip_gap=2.0)


def test_infeasible_budget_states_the_minimum(small):
    error, bits, numel = small
    minimum = np.nanmin(bits, axis=1).sum() / numel.sum()
    with pytest.raises(InfeasibleBudgetError, match=f"minimum feasible budget is {minimum:.4f} bits/param") as info:
        solve(error, bits, numel, minimum * 0.9)
    assert info.value.min_budget == pytest.approx(minimum)
    assert isinstance(info.value, ValueError)
    # The minimum itself is feasible, and every backend says the same.
    for backend in ("highs", "pulp-cbc", "lagrange"):
        assert solve(error, bits, numel, minimum, backend=backend).bits_per_param <= minimum * (1 + 1e-12)


def test_infeasible_message_rounds_up_when_needed():
    exc = InfeasibleBudgetError(2.0, 2.03452)
    assert "2.0345 bits/param" in str(exc) and "use >= 2.0346" in str(exc)
    assert "use >=" not in str(InfeasibleBudgetError(2.0, 2.5))


def test_budget_above_everything_takes_least_error(small):
    error, bits, numel = small
    sol = solve(error, bits, numel, 100.0)
    assert sol.note == ABOVE_MAX_NOTE and sol.status == "optimal" and sol.gap == 0.0
    np.testing.assert_array_equal(sol.choice, np.nanargmin(error, axis=1))


def test_time_limit_returns_best_found_without_claiming_optimality():
    error, bits, numel = random_problem(11, n_matrices=400, n_configs=60)
    budget = 4.0
    sol = solve(error, bits, numel, budget, time_limit=1e-6, core=False)
    assert sol.status in ("time_limit", "optimal")
    if sol.status == "time_limit":
        assert sol.gap >= 0.0 and sol.bound <= sol.objective
    assert sol.bits_per_param <= budget * (1 + 1e-9)
    assert sol.choice.shape == (400,)


def test_sweep_validates_budgets(small):
    with pytest.raises(ValueError, match="budget must be"):
        sweep(*small, [3.0, -1.0])
    with pytest.raises(ValueError, match="START:STOP:STEP"):
        sweep(*small, "3:x")
