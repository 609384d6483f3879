"""The core search (bounded DP) is exact when it says so, and reduced-cost fixing is lossless."""

from __future__ import annotations

import pytest
from solver_helpers import brute_force, feasible_budget, random_problem

from bitalloc.solvers.core_dp import search_optimum
from bitalloc.solvers.exact import reduced_costs
from bitalloc.solvers.lagrange import LagrangeHull
from bitalloc.solvers.problem import build_problem
from bitalloc.solvers.validation import capacity_bits, check_arrays


def _prepared(seed, ties=None, prune=True):
    error, bits, numel = random_problem(seed, holes=0.2 * (seed % 2))
    budget = feasible_budget(error, bits, numel, seed, ties)
    problem = build_problem(check_arrays(error, bits, numel, ties), prune=prune)
    capacity = capacity_bits(budget, problem.total_params)
    hull = LagrangeHull(problem)
    lagrange = hull.solve(capacity)
    rc, bound = reduced_costs(problem, lagrange.price, capacity)
    best, _ = brute_force(error, bits, numel, budget, ties)
    return problem, hull, capacity, lagrange, rc, bound, best


@pytest.mark.parametrize("ties", [None, [[0, 1], [3, 4, 5]]])
@pytest.mark.parametrize("prune", [True, False])
def test_exhaustive_core_search_finds_the_optimum(ties, prune):
    for seed in range(15):
        problem, hull, capacity, lagrange, rc, bound, best = _prepared(seed, ties, prune)
        assert bound <= best * (1 + 1e-9)
        assert (rc >= -1e-9 * abs(best)).all()
        outcome = search_optimum(problem, hull, capacity, lagrange, rc, bound, lagrange.pick, max_states=10**6)
        assert outcome.proven
        assert problem.pick_error(outcome.pick) == pytest.approx(best, rel=1e-9)
        assert problem.pick_bits(outcome.pick) <= capacity
        assert outcome.floor <= best * (1 + 1e-9)


def test_truncated_core_search_stays_feasible_and_says_so():
    error, bits, numel = random_problem(3, n_matrices=120, n_configs=30)
    budget = feasible_budget(error, bits, numel, 3)
    problem = build_problem(check_arrays(error, bits, numel))
    capacity = capacity_bits(budget, problem.total_params)
    hull = LagrangeHull(problem)
    lagrange = hull.solve(capacity)
    rc, bound = reduced_costs(problem, lagrange.price, capacity)
    outcome = search_optimum(problem, hull, capacity, lagrange, rc, bound, lagrange.pick, max_states=3, beam_states=2)
    assert problem.pick_bits(outcome.pick) <= capacity
    assert problem.pick_error(outcome.pick) <= problem.pick_error(lagrange.pick)
    if not outcome.proven:
        assert outcome.floor <= problem.pick_error(outcome.pick)


def test_reduced_cost_fixing_keeps_every_optimal_candidate():
    for seed in range(15):
        problem, hull, capacity, lagrange, rc, bound, best = _prepared(seed, [[0, 2]])
        incumbent = problem.pick_error(lagrange.pick)
        keep = rc <= (incumbent - bound) * (1 + 1e-9) + 1e-9
        # The optimum found without fixing uses only kept candidates.
        outcome = search_optimum(problem, hull, capacity, lagrange, rc, bound, lagrange.pick, max_states=10**6)
        assert keep[outcome.pick].all()
