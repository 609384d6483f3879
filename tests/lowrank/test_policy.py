"""Tests of bitalloc.lowrank.policy: LoopPolicy's validation, per-config values, JSON round trip."""

from __future__ import annotations

import json

import pytest

from bitalloc.lowrank import MANY_CONFIGS, ONE_CONFIG, LoopPolicy


def test_the_two_defaults_differ_in_tolerance_and_oversampling_only():
    one, many = ONE_CONFIG.to_dict(), MANY_CONFIGS.to_dict()
    assert {k for k in one if one[k] != many[k]} == {"tol", "oversample"}
    assert LoopPolicy() == ONE_CONFIG


@pytest.mark.parametrize("changes, match", [
    ({"max_iters": -1}, "max_iters"), ({"patience": 0}, "patience"), ({"oversample": 1.5}, "oversample"),
    ({"tol": 0.0}, "tol"), ({"tol": float("nan")}, "tol"), ({"stop_window": -1.0}, "stop_window"),
    ({"step": {3: (0.0, 0.4)}}, r"step\[3\]"), ({"step": {3: (1.5, -0.1)}}, r"step\[3\]"),
    ({"tol_factor": {2: -1.0}}, r"tol_factor\[2\]"),
    ({"repair_margin": {3: 1.0}}, r"repair_margin\[3\]"), ({"share": 1}, "share"),
    ({"cold_exact_max_side": 0}, "cold_exact_max_side"), ({"fisher_floor": 0.0}, "fisher_floor"),
])
def test_bad_values_are_refused_with_the_field_named(changes, match):
    with pytest.raises(ValueError, match=match):
        LoopPolicy(**changes)


def test_policies_are_frozen_and_their_mappings_read_only():
    p = LoopPolicy()
    with pytest.raises(AttributeError):
        p.tol = 0.5  # type: ignore[misc]
    with pytest.raises(TypeError):
        p.step[2] = (2.0, 0.0)  # type: ignore[index]
    q = p.replace(repair_margin={})
    assert q.repair_margin == {} and p.repair_margin == {3: 0.05, 4: 0.05, 8: 0.10}


def test_per_config_values():
    p = LoopPolicy(tol=0.01)
    assert p.relax_momentum(2) == (1.0, 0.0) and p.relax_momentum(8) == (2.5, 0.3)
    assert p.relax_momentum(5) == (1.0, 0.0)  # a width it does not name: plain alternation
    assert p.tolerance(4) == pytest.approx(0.04) and p.tolerance(5) == 0.01
    assert p.keeps_long_steps(8, 3) and not p.keeps_long_steps(8, 8) and not p.keeps_long_steps(4, 3)
    assert p.patience_for(8, 2) == 3 and p.patience_for(4, 2) == 2
    assert p.repairs(4, 2) and p.repairs(8, 3) and not p.repairs(8, 2) and not p.repairs(2, 4)
    assert not p.replace(repair_margin={}).repairs(4, 2)


def test_json_round_trip():
    p = MANY_CONFIGS.replace(repair_margin={4: 0.02}, coarse_first=frozenset({2, 3}))
    back = LoopPolicy.from_dict(json.loads(json.dumps(p.to_dict())))
    assert back.to_dict() == p.to_dict()
    assert back.relax_momentum(8) == p.relax_momentum(8) and back.repair_margin == {4: 0.02}
