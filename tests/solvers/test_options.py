"""SolveOptions: validation, JSON round trip, and one object passed to every solver level."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bitalloc.solvers import FUSE_PRESET, SolveOptions, solve, sweep


def test_defaults_and_normalized_fields():
    o = SolveOptions()
    assert o.objective is None and o.ties == () and o.backend == "highs" and o.mip_gap == 0.0
    assert o.warm_start and o.prune and o.core and not o.exclude_lowrank_from_budget
    o = SolveOptions(ties=["fuse", r"o_proj$"], min_bits="down_proj=4", max_bits=[("lm_head", 8)], time_limit=5)
    assert o.ties == ("fuse", r"o_proj$") and o.fuse
    assert o.min_bits == ("down_proj=4",) and o.max_bits == ("lm_head=8",)
    assert o.time_limit == 5.0 and isinstance(o.time_limit, float)
    assert SolveOptions(ties=FUSE_PRESET).ties == FUSE_PRESET
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.backend = "lagrange"


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"backend": "gurobi"}, "unknown solver backend"),
        ({"ties": ["("]}, "not a valid regex"),
        ({"ties": [""]}, "non-empty regex"),
        ({"min_bits": ["down_proj"]}, "REGEX=BITS"),
        ({"max_bits": ["x=-1"]}, "REGEX=BITS"),
        ({"mip_gap": 1.0}, "mip_gap"),
        ({"time_limit": -1}, "time_limit"),
        ({"objective": ""}, "objective"),
    ],
)
def test_bad_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SolveOptions(**kwargs)


def test_dict_round_trip_and_changes():
    o = SolveOptions(objective="plain", ties=("fuse",), min_bits=("a=3",), backend="pulp-cbc", mip_gap=0.01)
    d = o.to_dict()
    assert json.loads(json.dumps(d)) == d and d["ties"] == ["fuse"]
    assert SolveOptions.from_dict(d) == o
    with pytest.raises(ValueError, match="unknown solve options"):
        SolveOptions.from_dict({**d, "gurobi": True})
    assert SolveOptions.of(o) is o
    assert SolveOptions.of(o, backend="lagrange") == o.replace(backend="lagrange") != o
    assert SolveOptions.of(None, mip_gap=0.5).mip_gap == 0.5
    with pytest.raises(ValueError, match="SolveOptions"):
        SolveOptions.of({"backend": "highs"})


def _random_problem(seed: int = 0, m: int = 12, c: int = 5):
    rng = np.random.default_rng(seed)
    bits = np.sort(rng.uniform(1, 8, (m, c)), axis=1) * 100
    error = np.sort(rng.uniform(0, 1, (m, c)), axis=1)[:, ::-1] * 1e3
    return error, bits, np.full(m, 100.0)


def test_array_solvers_take_the_options_object():
    error, bits, numel = _random_problem()
    options = SolveOptions(backend="lagrange")
    by_object = solve(error, bits, numel, 4.0, options=options)
    by_name = solve(error, bits, numel, 4.0, backend="lagrange")
    assert by_object.backend == by_name.backend == "lagrange"
    np.testing.assert_array_equal(by_object.choice, by_name.choice)
    exact = solve(error, bits, numel, 4.0, options=options, backend="highs")
    assert exact.backend == "highs" and exact.objective <= by_object.objective + 1e-9
    swept = sweep(error, bits, numel, [3.0, 4.0], options=SolveOptions(warm_start=False))
    assert [s.budget for s in swept] == [3.0, 4.0] and swept[1].objective == pytest.approx(exact.objective)
