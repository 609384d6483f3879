"""`bitalloc.solve` / `bitalloc.sweep` on profile directories, and the solve/sweep commands."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from synthetic import synthetic_table, write_synthetic_profile

import bitalloc
from bitalloc.allocation import Allocation, SolveOptions
from bitalloc.cli import main
from bitalloc.configs import QuantConfig

#: An allocation file in format 1, written by `bitalloc solve` on ``synthetic_table(n_layers=1)`` with
#: ``--budget 3.25 --fuse --min-bits down_proj=4 --exclude-lowrank-from-budget``.
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "allocation-v1.json"
FIXTURE_OPTIONS = SolveOptions(ties=("fuse",), min_bits=("down_proj=4",), exclude_lowrank_from_budget=True)
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


def test_allocation_file_of_format_1_loads_with_every_key():
    data = json.loads(FIXTURE.read_text())
    alloc = Allocation.load(FIXTURE)
    assert alloc.budget == 3.25 and alloc.status == "optimal" and alloc.backend == "highs"
    assert alloc.ties == ("fuse",) and alloc.min_bits == ("down_proj=4",) and alloc.max_bits == ()
    assert alloc.exclude_lowrank_from_budget and alloc.objective_column == "fisher"
    assert alloc.bits_per_param > alloc.budget_bits_per_param  # the factors count in bits_per_param only
    assert alloc.provenance["model_hash"] == "hash-synthetic" and alloc.extra == {}
    assert alloc.to_dict() == data and list(alloc.to_dict()) == list(data)


def test_the_same_options_give_the_format_1_allocation(tmp_path):
    prof = write_synthetic_profile(tmp_path / "prof", synthetic_table(n_layers=1))
    new = bitalloc.solve(prof, 3.25, FIXTURE_OPTIONS).to_dict()
    old = json.loads(FIXTURE.read_text())
    for d in (new, old):
        d.pop("seconds"), d.pop("profile")
    assert new == old and list(new) == list(old)


def test_allocation_fields_and_unknown_keys(tmp_path):
    path = tmp_path / "a.json"
    path.write_text(json.dumps({"budget": 3, "bits_per_param": 3.1, "assignments": {"m": "nf3-g64-s8x256-r0"},
                                "custom": [1, 2]}))
    alloc = Allocation.load(path)
    assert alloc.budget == 3.0 and alloc.status is None and alloc.params_by_bits is None
    assert alloc.to_dict()["custom"] == [1, 2] and "params_by_bits" not in alloc.to_dict()
    assert Allocation.from_dict(alloc.to_dict()) == alloc
    with pytest.raises(ValueError, match="budget"):
        Allocation(budget=-1.0, bits_per_param=None)
    with pytest.raises(ValueError, match="assignments"):
        Allocation(budget=3.0, bits_per_param=3.0, assignments={"m": 3})
    with pytest.raises(ValueError, match="missing keys"):
        Allocation.from_dict({"budget": 3.0})
    assert Allocation(budget=3.0, bits_per_param=float("nan")).bits_per_param is None


def test_options_object_and_field_names_agree(prof):
    options = SolveOptions(objective="plain", ties=("fuse",), max_bits=("q_proj=3",))
    by_object = bitalloc.solve(prof, 3.0, options).to_dict()
    by_name = bitalloc.solve(prof, 3.0, objective="plain", ties=["fuse"], max_bits=["q_proj=3"]).to_dict()
    assert by_object["assignments"] == by_name["assignments"]
    assert by_object["ties"] == ["fuse"] and by_object["max_bits"] == ["q_proj=3"]
    changed = bitalloc.solve(prof, 3.0, options, max_bits=()).to_dict()
    assert changed["max_bits"] == [] and changed["objective_column"] == "plain"
    assert bitalloc.SolveOptions is SolveOptions


def test_sweep_profile(prof):
    pareto, allocs, _ = bitalloc.sweep(prof, "2.5:4.5:0.5")
    ilp = pareto[pareto["kind"] == "ilp"]
    assert ilp["budget"].tolist() == [2.5, 3.0, 3.5, 4.0, 4.5]
    assert (ilp["objective"].diff().dropna() <= 1e-9).all()
    assert (pareto["kind"] == "hull").any()
    assert len(allocs) == 5
    pareto, allocs, _ = bitalloc.sweep(prof, [1.0, 3.0])
    assert [a.feasible for a in allocs] == [False, True]
    assert allocs[0].assignments == {} and allocs[0].bits_per_param is None and "minimum feasible" in allocs[0].note
    assert "params_by_bits" not in allocs[0].to_dict() and "params_by_bits" in allocs[1].to_dict()


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


def test_cli_options_reach_the_allocation(prof, tmp_path, capsys):
    out = tmp_path / "alloc.json"
    assert main(["-q", "solve", str(prof), "--budget", "3.25", "--fuse", "--tie", "o_proj$", "--min-bits",
                 "down_proj=4", "--exclude-lowrank-from-budget", "--backend", "lagrange", "--objective", "plain",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["ties"] == ["o_proj$", "fuse"] and data["min_bits"] == ["down_proj=4"]
    assert data["exclude_lowrank_from_budget"] is True and data["backend"] == "lagrange"
    assert data["objective_column"] == "plain"
    assert data["budget_bits_per_param"] <= 3.25 * (1 + 1e-9) < data["bits_per_param"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budget", "1.0"], "minimum feasible budget"),
        (["--budget", "-2"], "budget"),
        (["--budget", "3", "--tie", "no_such_layer"], "no_such_layer"),
        (["--budget", "3", "--min-bits", "down_proj"], "REGEX=BITS"),
        (["--budget", "3", "--backend", "gurobi"], "backend"),
        (["--budget", "3", "--objective", "magic"], "magic"),
        (["--budget", "3", "--mip-gap", "2"], "mip_gap"),
        (["--budget", "3", "--time-limit", "0"], "time_limit"),
        (["--budget", "3", "--tie", "("], "not a valid regex"),
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


def _old_profile(directory: Path) -> Path:
    """A finished profile as bitalloc wrote it before the error_act and error_kl columns existed."""
    import hashlib

    from bitalloc.profiles.store import COLUMNS, TABLE_FILE

    out = write_synthetic_profile(directory)
    old_columns = [c for c in COLUMNS if c not in ("error_act", "error_kl")]
    df, _ = bitalloc.load_profile(out)
    data = df[old_columns].to_csv(index=False, float_format="%.17g").encode()
    (out / TABLE_FILE).write_bytes(data)
    meta = json.loads((out / "meta.json").read_text())
    meta["table"]["sha256"] = hashlib.sha256(data).hexdigest()
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_an_old_profile_solves_with_fisher_and_plain_and_names_the_command_for_act_and_kl(tmp_path, capsys):
    out = _old_profile(tmp_path / "old")
    assert "error_act" not in (out / "profile.csv").read_text().splitlines()[0]
    fisher = bitalloc.solve(out, 3.5)
    assert fisher.objective_column == "fisher" and fisher.status == "optimal"
    assert bitalloc.solve(out, 3.5, objective="plain").status == "optimal"
    for objective, column in (("act", "error_act"), ("kl", "error_kl")):
        with pytest.raises(ValueError, match=f"needs the column {column}") as info:
            bitalloc.solve(out, 3.5, objective=objective)
        message = str(info.value)
        assert f"bitalloc profile --out {out} --model synthetic" in message and "resumes" in message
        assert "--no-act" not in message.split("`")[-2]  # the command itself turns every column on
    assert main(["solve", str(out), "--budget", "3.5", "--objective", "act"]) == 2
    assert "needs the column error_act" in capsys.readouterr().err


def test_a_profile_without_fisher_names_a_new_profile_for_fisher(tmp_path):
    from synthetic import synthetic_table

    out = write_synthetic_profile(tmp_path / "nofisher", synthetic_table(fisher=False))
    with pytest.raises(ValueError, match="made without") as info:
        bitalloc.solve(out, 3.5, objective="fisher")
    assert f"--out {out}-fisher" in str(info.value) and "--no-fisher" not in str(info.value).split("`")[-2]
    assert bitalloc.solve(out, 3.5).objective_column == "plain"


def test_refinement_never_returns_a_worse_measured_kl(tiny_llama_dir, tiny_text_file, tmp_path, monkeypatch):
    from bitalloc.allocation import RefineOptions, refine
    from bitalloc.models import find_targets, load_model
    from bitalloc.models.allocation_probe import AllocationProbe
    from bitalloc.models.text import calibration_tokens
    from bitalloc.profiles import ProfileRequest, profile

    monkeypatch.setenv("BITALLOC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    space = tmp_path / "space.json"
    space.write_text(json.dumps(["nf2-g16-s16-r0", "nf3-g16-s16-r0", "nf4-g16-s16-r0", "nf8-g16-s16-r0"]))
    out = profile(ProfileRequest(model=str(tiny_llama_dir), out=tmp_path / "p", space=str(space), progress=False,
                                 fisher=False, calib=str(tiny_text_file), samples=3, seqlen=24, kl_windows=3))
    plain = bitalloc.solve(out, 3.5, objective="plain")
    refined = refine(out, 3.5, SolveOptions(objective="plain", ties=("fuse",)),
                     RefineOptions(iterations=2, progress=False))
    record = refined.extra["refinement"]
    assert len(record["rounds"]) == 2 and record["kl_runs"] > 2 and record["windows"] == 3
    assert record["kl_best"] <= record["kl_start"]
    assert record["kl_best"] == min([record["kl_start"]] + [r["kl"] for r in record["rounds"]])
    assert refined.bits_per_param <= 3.5 + 1e-9 and refined.objective_column == "plain"
    assert set(refined.to_dict()) >= set(plain.to_dict())  # new keys only
    # the chosen allocation measures as recorded, independently of the refinement's probe
    model, tokenizer = load_model(str(tiny_llama_dir))
    tokens = calibration_tokens(str(tiny_text_file), model, tokenizer, 24, 3, seed=0)
    measured = AllocationProbe(model, tokens, find_targets(model)).kl(refined.assignments)
    assert measured == pytest.approx(record["kl_best"], rel=1e-6)
    saved = refined.save(tmp_path / "refined.json")
    assert Allocation.load(saved).extra["refinement"]["kl_best"] == record["kl_best"]
