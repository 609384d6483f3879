"""Every exact backend matches brute-force enumeration on small random problems."""

from __future__ import annotations

import numpy as np
import pytest
from solver_helpers import brute_force, feasible_budget, random_problem

from bitalloc.solvers import solve

EXACT = ["highs", "pulp-highs", "pulp-cbc"]
TIES = [None, [[0, 1], [3, 4, 5]], [[1, 4]]]


def _check_against_brute_force(seed: int, backend: str, ties, holes: float, core: bool) -> None:
    error, bits, numel = random_problem(seed, holes=holes)
    budget = feasible_budget(error, bits, numel, seed, ties)
    best, _ = brute_force(error, bits, numel, budget, ties)
    sol = solve(error, bits, numel, budget, ties=ties, backend=backend, core=core)
    assert sol.objective == pytest.approx(best, rel=1e-9)
    assert sol.status == "optimal" and sol.gap == 0.0
    assert sol.bits_per_param <= budget * (1 + 1e-9)
    rows = np.arange(len(numel))
    assert np.isfinite(error[rows, sol.choice]).all()
    assert sol.total_bits == pytest.approx(bits[rows, sol.choice].sum())
    for tie in ties or []:
        assert len(set(sol.choice[tie].tolist())) == 1


@pytest.mark.parametrize("backend", EXACT)
@pytest.mark.parametrize("ties", TIES, ids=["no-ties", "two-ties", "one-tie"])
@pytest.mark.parametrize("holes", [0.0, 0.25], ids=["dense", "holes"])
def test_backend_matches_brute_force(backend, ties, holes):
    for seed in range(4):
        _check_against_brute_force(seed, backend, ties, holes, core=True)


@pytest.mark.parametrize("backend", EXACT)
def test_full_mip_without_core_matches_brute_force(backend):
    """``core=False`` hands every pruned candidate to the MIP solver (no fixing, no search)."""
    for seed in range(6):
        ties = TIES[seed % 3]
        _check_against_brute_force(100 + seed, backend, ties, 0.2 * (seed % 2), core=False)


def test_highs_many_random_problems():
    for seed in range(200, 260):
        ties = TIES[seed % 3]
        _check_against_brute_force(seed, "highs", ties, 0.15 * (seed % 3), core=True)


def test_integer_bits_tight_budget():
    """Integer bit counts with a budget exactly at an allocation's bits: never exceeded."""
    for seed in range(10):
        error, bits, numel = random_problem(seed, integer_bits=True)
        _, choice = brute_force(error, bits, numel, feasible_budget(error, bits, numel, seed))
        budget = bits[np.arange(len(numel)), choice].sum() / numel.sum()
        best, _ = brute_force(error, bits, numel, budget)
        sol = solve(error, bits, numel, budget)
        assert sol.objective == pytest.approx(best, rel=1e-9)
        assert sol.total_bits <= budget * numel.sum() * (1 + 1e-12)


def test_determinism():
    error, bits, numel = random_problem(7, n_matrices=40, n_configs=12)
    budget = feasible_budget(error, bits, numel, 7)
    runs = [solve(error, bits, numel, budget, ties=[[0, 1, 2], [10, 11]]) for _ in range(3)]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.choice, runs[0].choice)
        assert other.objective == runs[0].objective


def test_exact_ties_are_broken_the_same_way():
    """Two identical matrices: the choice must not depend on the run."""
    error = np.array([[4.0, 2.0, 1.0], [4.0, 2.0, 1.0]])
    bits = np.array([[2.0, 3.0, 4.0], [2.0, 3.0, 4.0]])
    numel = np.array([1.0, 1.0])
    choices = {tuple(solve(error, bits, numel, 3.5, backend=b).choice.tolist()) for b in EXACT for _ in range(2)}
    objectives = {solve(error, bits, numel, 3.5, backend=b).objective for b in EXACT}
    assert objectives == {3.0}
    assert len({tuple(solve(error, bits, numel, 3.5).choice.tolist()) for _ in range(3)}) == 1
    assert all(sorted(c) == [1, 2] for c in choices)


def test_medium_problem_backends_agree():
    """A few hundred candidates: every exact backend, with and without the core, same optimum."""
    error, bits, numel = random_problem(3, n_matrices=60, n_configs=20, holes=0.1)
    budget = feasible_budget(error, bits, numel, 3)
    ties = [[0, 1, 2], [30, 31]]
    objs = [solve(error, bits, numel, budget, ties=ties, backend=b, core=c).objective
            for b in EXACT for c in (True, False)]
    assert max(objs) == pytest.approx(min(objs), rel=1e-9)
