"""The Lagrangian backend and hull: bound <= optimum <= its feasible allocation."""

from __future__ import annotations

import numpy as np
import pytest
from solver_helpers import brute_force, feasible_budget, random_problem

from bitalloc.solvers import lagrange_hull, solve


@pytest.mark.parametrize("ties", [None, [[0, 1], [3, 4, 5]]])
def test_bound_below_optimum_below_feasible(ties):
    for seed in range(12):
        error, bits, numel = random_problem(seed, holes=0.2 * (seed % 2))
        budget = feasible_budget(error, bits, numel, seed, ties)
        best, _ = brute_force(error, bits, numel, budget, ties)
        lag = solve(error, bits, numel, budget, ties=ties, backend="lagrange")
        assert lag.bound <= best * (1 + 1e-9)
        assert best <= lag.objective * (1 + 1e-9)
        assert lag.bits_per_param <= budget * (1 + 1e-9)
        assert lag.gap == pytest.approx(max(0.0, (lag.objective - lag.bound) / lag.objective), abs=1e-12)
        assert lag.status in ("optimal", "feasible")
        ilp = solve(error, bits, numel, budget, ties=ties)
        assert lag.bound <= ilp.objective * (1 + 1e-9) <= lag.objective * (1 + 1e-9) + 1e-9


def test_lagrange_gap_small_on_many_matrices():
    error, bits, numel = random_problem(5, n_matrices=300, n_configs=30)
    budget = feasible_budget(error, bits, numel, 5)
    lag = solve(error, bits, numel, budget, backend="lagrange")
    ilp = solve(error, bits, numel, budget)
    assert lag.bound <= ilp.objective <= lag.objective
    assert lag.gap < 1e-2


def test_hull_is_convex_and_falling():
    error, bits, numel = random_problem(4, n_matrices=20, n_configs=15, holes=0.1)
    hull = lagrange_hull(error, bits, numel)
    assert list(hull.columns) == ["bits_per_param", "objective", "lambda"]
    b, e, lam = (hull[c].to_numpy() for c in ("bits_per_param", "objective", "lambda"))
    assert np.all(np.diff(b) > 0) and np.all(np.diff(e) < 0)
    assert np.isinf(lam[0]) and np.all(np.diff(lam[1:]) <= 1e-12 * lam[1:-1])
    slopes = -np.diff(e) / np.diff(b)
    np.testing.assert_allclose(slopes, lam[1:], rtol=1e-9)
    # The cheapest and the least-error allocations are its ends.
    assert b[0] == pytest.approx(np.nanmin(np.where(np.isfinite(error), bits, np.nan), axis=1).sum() / numel.sum())


def test_hull_bounds_every_budget():
    error, bits, numel = random_problem(6, n_matrices=8, n_configs=6)
    hull = lagrange_hull(error, bits, numel, ties=[[0, 1]])
    for budget in np.linspace(hull.bits_per_param.iloc[0], hull.bits_per_param.iloc[-1], 7)[1:-1]:
        bound = np.interp(budget, hull.bits_per_param, hull.objective)
        best, _ = brute_force(error, bits, numel, budget, [[0, 1]])
        assert bound <= best * (1 + 1e-9)


def test_vectorized_hulls_match_the_monotone_chain():
    from bitalloc.solvers.lagrange import _lower_hull_decreasing, lower_hulls

    rng = np.random.default_rng(3)
    sizes = rng.integers(1, 12, 400)
    start = np.concatenate([[0], np.cumsum(sizes)])
    # coarse values: many equal bits, equal errors and collinear points
    bits = rng.integers(0, 8, start[-1]).astype(float)
    err = rng.integers(0, 10, start[-1]).astype(float)
    for g in range(sizes.size):
        lo, hi = start[g], start[g + 1]
        order = np.lexsort((err[lo:hi], bits[lo:hi]))
        bits[lo:hi], err[lo:hi] = bits[lo:hi][order], err[lo:hi][order]
    vertices, counts = lower_hulls(bits, err, start)
    expect = [_lower_hull_decreasing(bits, err, int(start[g]), int(start[g + 1])) for g in range(sizes.size)]
    assert counts.tolist() == [len(h) for h in expect]
    assert vertices.tolist() == [k for h in expect for k in h]
