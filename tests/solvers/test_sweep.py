"""Sweeps over budgets and the budget grammar."""

from __future__ import annotations

import numpy as np
import pytest
from solver_helpers import brute_force, random_problem

from bitalloc.solvers import parse_budgets, solve, sweep
from bitalloc.solvers.solution import ABOVE_MAX_NOTE


def test_parse_budgets_range_includes_end_on_grid():
    assert parse_budgets("2.25:4.5:0.05") == pytest.approx(np.round(np.arange(2.25, 4.5001, 0.05), 10).tolist())
    assert len(parse_budgets("2.25:4.5:0.05")) == 46
    assert parse_budgets("2.25:4.5:0.05")[-1] == 4.5
    assert parse_budgets("3:4:0.3") == pytest.approx([3.0, 3.3, 3.6, 3.9])  # 4.0 is off the grid
    assert parse_budgets("0.1:0.3:0.1") == pytest.approx([0.1, 0.2, 0.3])  # float steps still land
    assert parse_budgets("2.5,3,3.5") == [2.5, 3.0, 3.5]
    assert parse_budgets(" 3 ") == [3.0]


@pytest.mark.parametrize("text", ["3:x", "2:3", "a,b", "", "3:2:0.5", "2:3:0", "2:3:-1", "1,,2", "2;3", "-1,2"])
def test_parse_budgets_rejects_bad_grammar(text):
    with pytest.raises(ValueError, match="START:STOP:STEP|budgets must be positive|invalid budgets"):
        parse_budgets(text)


def test_parse_budgets_message_shows_the_form():
    with pytest.raises(ValueError, match=r"expected START:STOP:STEP .*2\.25:4\.5:0\.05.*comma list"):
        parse_budgets("3:x")


@pytest.mark.parametrize("backend", ["highs", "pulp-cbc", "lagrange"])
def test_sweep_is_monotone_and_matches_solve(backend):
    error, bits, numel = random_problem(3, n_matrices=6, n_configs=5)
    budgets = [5.0, 3.0, 4.0, 3.5, 4.5, 6.0, 7.5]  # out of order on purpose
    sols = sweep(error, bits, numel, budgets, backend=backend, ties=[[0, 1]])
    assert [s.budget for s in sols] == budgets
    ordered = sorted(sols, key=lambda s: s.budget)
    objs = [s.objective for s in ordered if s.feasible]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(objs, objs[1:])) or backend == "lagrange"
    for s in sols:
        if not s.feasible:
            continue
        assert s.bits_per_param <= s.budget * (1 + 1e-9)
        if backend != "lagrange":
            best, _ = brute_force(error, bits, numel, s.budget, [[0, 1]])
            assert s.objective == pytest.approx(best, rel=1e-9)
            assert s.objective == pytest.approx(solve(error, bits, numel, s.budget, ties=[[0, 1]]).objective)


def test_sweep_accepts_grammar_and_marks_infeasible_budgets():
    error, bits, numel = random_problem(4)
    sols = sweep(error, bits, numel, "0.5:8:0.5")
    assert len(sols) == 16
    infeasible = [s for s in sols if s.status == "infeasible"]
    assert infeasible and infeasible[0].budget == 0.5
    assert "minimum feasible budget" in infeasible[0].note and (infeasible[0].choice == -1).all()
    assert sols[-1].note == ABOVE_MAX_NOTE and sols[-1].status == "optimal"


def test_warm_and_cold_sweeps_agree():
    error, bits, numel = random_problem(9, n_matrices=50, n_configs=15, holes=0.1)
    budgets = parse_budgets("3:6:0.25")
    warm = sweep(error, bits, numel, budgets, warm_start=True)
    cold = sweep(error, bits, numel, budgets, warm_start=False)
    for w, c in zip(warm, cold):
        assert w.objective == pytest.approx(c.objective, rel=1e-9)
        assert w.status == c.status == "optimal"
