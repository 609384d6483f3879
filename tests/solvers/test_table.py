"""Profile tables: arrays, objectives, ties, bit bounds, LQ-LoRA budgets, allocation dicts."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from bitalloc.configs import QuantConfig
from bitalloc.solvers import (
    FUSE_PRESET,
    SolveOptions,
    allocation_dict,
    apply_bit_bounds,
    parse_bounds,
    profile_arrays,
    solve_table,
    sweep_table,
    tie_groups,
)

CONFIGS = ["nf2-g64-s8x256-r0", "nf3-g64-s8x256-r0", "nf4-g64-s8x256-r0", "nf8-g64-s8x256-r0",
           "nf2-g64-s8x256-r8", "nf3-g64-s8x256-r8"]
KINDS = {"self_attn.q_proj": (64, 64), "self_attn.k_proj": (16, 64), "self_attn.v_proj": (16, 64),
         "self_attn.o_proj": (64, 64), "mlp.gate_proj": (128, 64), "mlp.up_proj": (128, 64),
         "mlp.down_proj": (64, 128)}


def make_table(n_layers: int = 2, fisher: bool = True, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for layer in range(n_layers):
        for kind, (r, c) in KINDS.items():
            sens = rng.lognormal(0, 1)
            for name in CONFIGS:
                cfg = QuantConfig.from_name(name)
                err = r * c * 2.0 ** (-2 * cfg.bits) * (0.8 if cfg.rank else 1.0) * sens * rng.uniform(0.95, 1.05)
                rows.append({"matrix": f"model.layers.{layer}.{kind}", "rows": r, "cols": c, "config": name,
                             "storage_bits": cfg.storage_bits(r, c), "error": err,
                             "error_fisher": err * rng.lognormal(0, 0.3) if fisher else np.nan})
    return pd.DataFrame(rows)


def test_profile_arrays_shapes_and_order():
    df = make_table()
    a = profile_arrays(df, objective="plain")
    assert a.matrices[:2] == ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]
    assert a.configs == CONFIGS
    assert a.error.shape == a.storage_bits.shape == (14, 6)
    assert a.numel[1] == 16 * 64
    assert a.objective_column == "error"
    np.testing.assert_array_equal(a.budget_bits, a.storage_bits)
    assert profile_arrays(df).objective_column == "error_fisher"


def test_missing_rows_become_nan_and_duplicates_are_refused():
    df = make_table()
    a = profile_arrays(df.iloc[1:], objective="plain")
    j = a.configs.index(CONFIGS[0])
    assert np.isnan(a.error[0, j]) and np.isnan(a.storage_bits[0, j]) and np.isfinite(a.error[1, j])
    with pytest.raises(ValueError, match="repeated"):
        profile_arrays(pd.concat([df, df.iloc[:1]]), objective="plain")
    with pytest.raises(ValueError, match="lacks columns"):
        profile_arrays(df.drop(columns=["rows"]))


def test_fisher_requested_without_fisher_errors():
    df = make_table(fisher=False)
    with pytest.raises(ValueError, match="needs the column error_fisher"):
        solve_table(df, 4.0, objective="fisher")
    with pytest.raises(ValueError, match="'magic'"):
        solve_table(df, 4.0, objective="magic")
    res = solve_table(df, 4.0, objective="plain")
    assert res.objective_column == "error" and res.solution.status == "optimal"


def test_exclude_lowrank_from_budget():
    df = make_table()
    a = profile_arrays(df, objective="plain", exclude_lowrank_from_budget=True)
    j = CONFIGS.index("nf2-g64-s8x256-r8")
    lowrank = QuantConfig.from_name(CONFIGS[j]).lowrank_storage_bits(64, 64)
    assert a.storage_bits[0, j] - a.budget_bits[0, j] == lowrank
    counted = solve_table(df, 3.5, objective="plain").solution
    excluded = solve_table(df, 3.5, SolveOptions(objective="plain", exclude_lowrank_from_budget=True)).solution
    assert excluded.objective <= counted.objective
    assert excluded.bits_per_param <= 3.5 * (1 + 1e-12)
    assert excluded.full_bits_per_param >= excluded.bits_per_param


def test_tie_groups_by_layer_key():
    names = [f"model.layers.{i}.self_attn.{k}_proj" for i in range(2) for k in "qkvo"]
    assert tie_groups(names, [r"self_attn\.[qkv]_proj"]) == [[0, 1, 2], [4, 5, 6]]
    with pytest.raises(ValueError, match=r"tie pattern 'nothing_here' matches no matrix"):
        tie_groups(names, ["nothing_here"])
    with pytest.raises(ValueError, match="not a valid regex"):
        tie_groups(names, ["("])
    with pytest.raises(ValueError, match="matches two tie patterns"):
        tie_groups(names, [r"q_proj", r"self_attn\.[qk]_proj"])


def test_fuse_preset_skips_unmatched_patterns():
    df = make_table()
    names = profile_arrays(df, objective="plain").matrices
    assert tie_groups(names, FUSE_PRESET) == tie_groups(names, "fuse") == [[0, 1, 2], [4, 5], [7, 8, 9], [11, 12]]
    gpt2 = ["h.0.attn.c_attn", "h.0.attn.c_proj", "h.0.mlp.c_fc"]
    assert tie_groups(gpt2, "fuse") == []  # already fused: nothing to tie
    mixtral = [f"layers.0.block_sparse_moe.experts.{e}.w{k}" for e in range(2) for k in (1, 2, 3)]
    assert tie_groups(mixtral, ["fuse"]) == [[0, 2], [3, 5]]


def test_solve_table_with_ties_and_bounds():
    df = make_table()
    options = SolveOptions(objective="plain", ties=(r"self_attn\.[qkv]_proj", r"mlp\.(gate|up)_proj"),
                           min_bits=("down_proj=4",), max_bits=(r"layers\.1\.self_attn\.o_proj=3",))
    res = solve_table(df, 3.2, options)
    sol, assignments = res.solution, res.assignments
    for layer in range(2):
        assert len({assignments[f"model.layers.{layer}.self_attn.{k}_proj"] for k in "qkv"}) == 1
        assert len({assignments[f"model.layers.{layer}.mlp.{k}_proj"] for k in ("gate", "up")}) == 1
        down = QuantConfig.from_name(assignments[f"model.layers.{layer}.mlp.down_proj"])
        assert down.bits_per_param(64, 128) >= 4
    assert QuantConfig.from_name(assignments["model.layers.1.self_attn.o_proj"]).bits_per_param(64, 64) <= 3
    assert sol.bits_per_param <= 3.2 * (1 + 1e-12)
    assert res.tie_groups[0] == [f"model.layers.0.self_attn.{k}_proj" for k in "qkv"]
    assert res.min_bits == [("down_proj", 4.0)]
    d = res.to_dict("p")
    assert d["ties"] == res.tie_groups and d["min_bits"] == [["down_proj", 4.0]]


def test_bounds_grammar_and_empty_matrices():
    assert parse_bounds("lm_head|down_proj=3") == [("lm_head|down_proj", 3.0)]
    assert parse_bounds(["a=2.5", ("b", 4)]) == [("a", 2.5), ("b", 4.0)]
    assert parse_bounds(["(?=x)y=3"]) == [("(?=x)y", 3.0)]  # '=' inside the regex is fine
    for bad in ["down_proj", "=3", "x=abc", "x=-1", "(=3", "x=inf"]:
        with pytest.raises(ValueError, match="REGEX=BITS"):
            parse_bounds(bad)
    bpp = np.array([[2.0, 3.0, np.nan], [2.0, 4.0, 8.0]])
    assert apply_bit_bounds(bpp, ["a", "b"], [("a", 2.5)], [("b", 4)]).tolist() == [[False, True, False], [True, True, False]]
    with pytest.raises(ValueError, match=r"matrix 'a' has no config within its bits bounds \[5, inf\]"):
        apply_bit_bounds(bpp, ["a", "b"], [("a", 5)])
    with pytest.raises(ValueError, match="--max-bits pattern 'zzz' matches no matrix"):
        apply_bit_bounds(bpp, ["a", "b"], (), [("zzz", 3)])


def test_floor_unavailable_to_one_tie_member_removes_it_for_the_group():
    df = make_table()
    assignments = solve_table(df, 4.0, objective="plain", ties=[r"self_attn\.[qkv]_proj"],
                              min_bits=[r"layers\.0\.self_attn\.k_proj=5"]).assignments
    for k in "qkv":
        assert QuantConfig.from_name(assignments[f"model.layers.0.self_attn.{k}_proj"]).bits == 8


def test_allocation_dict_contract_and_json():
    df = make_table()
    res = solve_table(df, 3.5, objective="plain", exclude_lowrank_from_budget=True)
    sol, assignments = res.solution, res.assignments
    base = allocation_dict(sol, assignments, 3.5, "prof-1")
    d = res.to_dict("prof-1")
    assert d == {**base, "objective_column": "error", "exclude_lowrank_from_budget": True,
                 "n_configs": len(CONFIGS), "total_params": 2 * sum(r * c for r, c in KINDS.values()),
                 "ties": [], "min_bits": [], "max_bits": [], "params_by_bits": res.params_by_bits}
    for key in ("budget", "bits_per_param", "objective", "status", "gap", "seconds", "backend", "profile",
                "assignments", "bits_histogram", "n_candidates_after_pruning"):
        assert key in d
    assert d["profile"] == "prof-1" and d["budget"] == 3.5 and d["status"] == "optimal"
    assert d["bits_per_param"] == pytest.approx(sol.full_bits_per_param)
    assert d["budget_bits_per_param"] == pytest.approx(sol.bits_per_param)
    assert sum(d["bits_histogram"].values()) == len(assignments)
    assert sum(d["params_by_bits"].values()) == pytest.approx(1.0)
    json.dumps(d, allow_nan=False)


def test_sweep_table():
    df = make_table()
    res = sweep_table(df, "2.5:4.5:0.5", objective="plain", ties="fuse")
    frame = res.frame()
    assert frame["budget"].tolist() == [2.5, 3.0, 3.5, 4.0, 4.5]
    assert (frame["objective"].diff().dropna() <= 1e-9).all()
    assert len(res.hull) > 2 and list(res.hull.columns) == ["bits_per_param", "objective", "lambda"]
    allocs = res.allocations("p")
    assert len(allocs) == 5 and all(a["profile"] == "p" for a in allocs)
    json.dumps(allocs, allow_nan=False)
