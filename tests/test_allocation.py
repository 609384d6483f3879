"""`bitalloc.solve` / `bitalloc.sweep` on profile directories, and the solve/sweep commands."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from synthetic import synthetic_table, write_synthetic_profile

import bitalloc
from bitalloc.allocation import Allocation
from bitalloc.cli import main
from bitalloc.configs import QuantConfig

CONTRACT_KEYS = ("budget", "bits_per_param", "objective", "status", "gap", "seconds", "backend", "profile", "assignments")


@pytest.fixture
def prof(tmp_path):
    return write_synthetic_profile(tmp_path / "prof")


def _achieved_bits(df: pd.DataFrame, assignments: dict[str, str]) -> float:
    chosen = df.set_index(["matrix", "config"]).loc[list(assignments.items())]
    numel = df.drop_duplicates("matrix").eval("rows * cols").sum()
    return float(chosen["storage_bits"].sum() / numel)


def test_solve_profile(prof):
    alloc = bitalloc.solve(prof, 3.5)
    d = alloc.to_dict()
    for key in CONTRACT_KEYS:
        assert key in d
    df, _ = bitalloc.load_profile(prof)
    assert set(d["assignments"]) == set(df["matrix"])
    assert d["status"] == "optimal" and d["gap"] == 0
    assert d["bits_per_param"] <= 3.5 + 1e-12
    assert d["bits_per_param"] == pytest.approx(_achieved_bits(df, d["assignments"]))
    assert d["objective_column"] == "fisher"
    assert d["profile"] == str(prof)


@pytest.mark.parametrize("ties", [[r"self_attn\.[qkv]_proj", r"mlp\.(gate|up)_proj"], ["fuse"]])
def test_solve_plain_objective_and_ties(prof, ties):
    alloc = bitalloc.solve(prof, 3.0, objective="plain", ties=ties)
    a = alloc.assignments
    for layer in range(3):
        qkv = {a[f"model.layers.{layer}.self_attn.{k}_proj"] for k in "qkv"}
        gate_up = {a[f"model.layers.{layer}.mlp.{k}_proj"] for k in ("gate", "up")}
        assert len(qkv) == 1 and len(gate_up) == 1


def test_min_bits_floor(prof):
    alloc = bitalloc.solve(prof, 3.0, min_bits=[r"down_proj=4"])
    for name, cfg in alloc.assignments.items():
        if name.endswith("down_proj"):
            assert QuantConfig.from_name(cfg).bits_per_param(64, 128) >= 4


def test_exclude_lowrank_from_budget(prof):
    counted = bitalloc.solve(prof, 3.2)
    excluded = bitalloc.solve(prof, 3.2, exclude_lowrank_from_budget=True)
    assert excluded.to_dict()["objective"] <= counted.to_dict()["objective"]
    assert excluded.bits_per_param >= excluded.to_dict()["budget_bits_per_param"]


def test_infeasible_budget_names_minimum(prof):
    df, _ = bitalloc.load_profile(prof)
    cheapest = df.groupby("matrix")["storage_bits"].min().sum() / df.drop_duplicates("matrix").eval("rows*cols").sum()
    with pytest.raises(ValueError, match="minimum feasible budget") as info:
        bitalloc.solve(prof, 1.0)
    assert f"{cheapest:.4f}" in str(info.value)


def test_allocation_json_round_trip(prof, tmp_path):
    alloc = bitalloc.solve(prof, 3.5)
    path = alloc.save(tmp_path / "a.json")
    again = Allocation.load(path)
    assert again.to_dict() == json.loads(json.dumps(alloc.to_dict()))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="not a valid allocation"):
        Allocation.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="missing keys"):
        Allocation.load(tmp_path / "other.json")


def test_sweep_profile(prof):
    pareto, allocs, _ = bitalloc.sweep(prof, "2.5:4.5:0.5")
    ilp = pareto[pareto["kind"] == "ilp"]
    assert ilp["budget"].tolist() == [2.5, 3.0, 3.5, 4.0, 4.5]
    assert (ilp["objective"].diff().dropna() <= 1e-9).all()
    assert (pareto["kind"] == "hull").any()
    assert len(allocs) == 5


def test_no_fisher_profile_defaults_to_plain(tmp_path):
    prof = write_synthetic_profile(tmp_path / "p", synthetic_table(fisher=False))
    assert bitalloc.solve(prof, 3.5).to_dict()["objective_column"] == "plain"
    with pytest.raises(ValueError, match="error_fisher"):
        bitalloc.solve(prof, 3.5, objective="fisher")


def test_cli_solve(prof, tmp_path, capsys):
    out = tmp_path / "alloc.json"
    assert main(["-q", "solve", str(prof), "--budget", "3.25", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "bits/param" in text and "optimal" in text
    data = json.loads(out.read_text())
    assert data["budget"] == 3.25
    assert main(["-q", "solve", str(prof), "--budget", "3.25", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["assignments"] == data["assignments"]


def test_cli_sweep(prof, tmp_path, capsys):
    out = tmp_path / "pareto.csv"
    assert main(["-q", "sweep", str(prof), "--budgets", "2.5:4.5:0.25", "--out", str(out),
                 "--allocs", str(tmp_path / "allocs")]) == 0
    table = pd.read_csv(out)
    assert (table["kind"] == "ilp").sum() == 9
    assert len(list((tmp_path / "allocs").glob("*.json"))) == 9


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "1.0"], "minimum feasible budget"),
        (["--budget", "-2"], "budget"),
        (["--budget", "3", "--tie", "no_such_layer"], "no_such_layer"),
        (["--budget", "3", "--min-bits", "down_proj"], "REGEX=BITS"),
        (["--budget", "3", "--backend", "gurobi"], "backend"),
        (["--budget", "3", "--objective", "magic"], "magic"),
    ],
)
def test_cli_solve_bad_input(prof, argv, message, capsys):
    assert main(["-q", "solve", str(prof)] + argv) == 2
    assert message in capsys.readouterr().err


def test_cli_bad_profile(tmp_path, capsys):
    assert main(["-q", "solve", str(tmp_path / "missing"), "--budget", "3"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["-q", "sweep", str(tmp_path / "missing"), "--budgets", "3:2:x"]) == 2


def test_cli_bad_budgets(prof, capsys):
    assert main(["-q", "sweep", str(prof), "--budgets", "3:x"]) == 2
    assert "budgets" in capsys.readouterr().err
