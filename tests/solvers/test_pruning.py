"""Dominance pruning: what it keeps, and that it never changes the optimum."""

from __future__ import annotations

import numpy as np
import pytest
from solver_helpers import brute_force, feasible_budget, random_problem

from bitalloc.solvers import prune_dominated, solve


def test_keeps_the_staircase():
    error = np.array([5.0, 4.0, 4.0, 6.0, 1.0, 3.0])
    bits = np.array([2.0, 3.0, 3.0, 3.5, 4.0, 4.0])
    # col 1/2 are exact duplicates (keep the first), col 3 and 5 are dominated.
    assert prune_dominated(error, bits).tolist() == [True, True, False, False, True, False]


def test_equal_error_more_bits_is_dropped_and_nan_never_kept():
    error = np.array([[2.0, 2.0, np.nan, 1.0], [np.nan, 3.0, 1.0, np.inf]])
    bits = np.array([[2.0, 3.0, 1.0, 4.0], [1.0, 2.0, 5.0, 9.0]])
    assert prune_dominated(error, bits).tolist() == [[True, False, False, True], [False, True, True, False]]


def test_survivors_have_falling_error_by_bits():
    error, bits, _ = random_problem(1, n_matrices=30, n_configs=40, holes=0.2)
    keep = prune_dominated(error, bits)
    for row in range(error.shape[0]):
        cols = np.flatnonzero(keep[row])
        order = np.argsort(bits[row, cols], kind="stable")
        assert np.all(np.diff(bits[row, cols][order]) > 0)
        assert np.all(np.diff(error[row, cols][order]) < 0)
        # every dropped available config is dominated by a kept one
        for c in np.flatnonzero(np.isfinite(error[row]) & ~keep[row]):
            assert np.any((bits[row, cols] <= bits[row, c]) & (error[row, cols] <= error[row, c]))


@pytest.mark.parametrize("ties", [None, [[0, 1, 2]], [[0, 5], [2, 3]]])
def test_pruning_never_changes_the_optimum(ties):
    for seed in range(8):
        error, bits, numel = random_problem(seed, holes=0.2)
        budget = feasible_budget(error, bits, numel, seed, ties)
        pruned = solve(error, bits, numel, budget, ties=ties)
        unpruned = solve(error, bits, numel, budget, ties=ties, prune=False)
        assert pruned.objective == pytest.approx(unpruned.objective, rel=1e-9)
        assert pruned.n_candidates_after_pruning <= unpruned.n_candidates_after_pruning


def test_ties_prune_on_group_sums():
    """A config dominated for one member but needed by the tied group must survive."""
    error = np.array([[10.0, 9.0, 1.0], [10.0, 1.0, 9.0]])
    bits = np.array([[1.0, 2.0, 2.0], [1.0, 2.0, 2.0]])
    numel = np.array([1.0, 1.0])
    # Member by member, column 1 is dominated in row 0 and column 2 in row 1; as a group
    # (sums: error 20, 10, 10; bits 2, 4, 4) columns 1 and 2 tie and one must survive.
    sol = solve(error, bits, numel, 2.0, ties=[[0, 1]])
    assert sol.objective == pytest.approx(10.0)
    assert sol.n_candidates_after_pruning == 2  # column 0 and one of the equal columns
    best, _ = brute_force(error, bits, numel, 2.0, [[0, 1]])
    assert sol.objective == pytest.approx(best)


def test_survivor_count_is_reported():
    error, bits, numel = random_problem(2, n_matrices=10, n_configs=30)
    sol = solve(error, bits, numel, feasible_budget(error, bits, numel, 2))
    assert sol.n_candidates == 300
    assert 10 <= sol.n_candidates_after_pruning < 300
    assert sol.to_dict()["n_candidates_after_pruning"] == sol.n_candidates_after_pruning
