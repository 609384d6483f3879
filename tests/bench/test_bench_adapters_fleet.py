"""bench/adapters_fleet.py on a fleet of two adapters: it profiles, solves and writes its report."""

from __future__ import annotations

import json
import sys

import pytest

from bench_scripts import load_bench



@pytest.fixture(scope="module")
def bench():
    return load_bench("adapters_fleet.py", "adapters_fleet")


def test_small_fleet(bench, tmp_path, monkeypatch):
    out = tmp_path / "fleet"
    monkeypatch.setattr(sys, "argv", ["adapters_fleet.py", "--adapters", "2", "--bits", "2,3", "--budget", "1.9",
                                      "--fit", "--time-limit", "5", "--out", str(out)])
    assert bench.main() == 0
    res = json.loads((out / "results.json").read_text())
    assert res["modules"] == 2 * 30 * 7 and res["plain_configs"] == 2 * 16 + 1 and res["configs"] == 2 * (2 * 16) + 1
    fleet = res["fleet"]
    assert fleet["bits_per_param"] <= 1.9 and fleet["bound"] <= fleet["objective"]
    assert fleet["status"] == "optimal" if fleet["used"] == "highs" else fleet["gap"] <= 1e-4
    assert res["fleet_exact"]["status"] in ("optimal", "time_limit")
    assert res["fleet_exact"]["objective"] <= fleet["objective"] * (1 + 1e-12)
    assert res["fleet_fit"]["objective"] <= fleet["objective"] * (1 + 2e-4)  # a superset of configs
    assert all(row["error_fit"] < row["error"] for row in res["fit"] if row["config"].startswith("lq2"))
    assert res["per_adapter"]["objective"] >= res["fleet"]["objective"] * (1 - 1e-4)
    for variant in res["variants"]:  # the solver is never worse than the fixed rule at its bits
        assert variant["solver"]["objective"] <= variant["objective"] * (1 + 1e-12)
    assert "Goal: solve under 10 s: " in (out / "results.md").read_text()
    assert res["fleet_lagrange"]["bits_per_param"] <= 1.9
