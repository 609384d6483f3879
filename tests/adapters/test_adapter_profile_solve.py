import math

import pytest
import torch

from bitalloc.adapters import (
    PAPER_VARIANTS,
    AdapterSpace,
    fleet_min_budget,
    load_adapter_profile,
    profile_adapters,
    read_adapter,
    solve_adapters,
)
from bitalloc.solvers import InfeasibleBudgetError


@pytest.fixture(scope="module")
def profile_dir(adapter_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("profile") / "p"
    return profile_adapters(adapter_dirs, out, groups=[32, 64, 128])


def _paper_high(s: torch.Tensor, rho: float) -> int:
    energy = s.double() ** 2
    share = torch.cumsum(energy, 0) / energy.sum()
    return int((share < rho - 1e-12).sum()) + 1


def test_profile_rows_and_errors(adapter_dirs, profile_dir):
    prof = load_adapter_profile(profile_dir)
    adapters = [read_adapter(d) for d in adapter_dirs]
    n_modules = sum(len(a.modules) for a in adapters)
    assert len(prof.modules) == n_modules == prof.meta["n_modules"]
    per_module = len(AdapterSpace().configs(8))
    assert len(prof.table) == n_modules * per_module
    assert [a["name"] for a in prof.meta["adapters"]] == ["math", "chat"]
    for adapter in adapters:
        for module in adapter.modules:
            row = prof.modules[prof.modules["matrix"] == f"{adapter.name}/{module.name}"].iloc[0]
            dense = module.delta()
            assert math.isclose(row["delta_norm_sq"], float((dense ** 2).sum()), rel_tol=1e-9)
            rows = prof.table[prof.table["matrix"] == row["matrix"]].set_index("config")
            assert rows.loc["lq8-h8-g32", "error"] < 1e-4 * row["delta_norm_sq"]
            assert rows.loc["lq2-h0-g128", "error"] > rows.loc["lq8-h8-g32", "error"]


def test_profile_refuses_a_non_empty_out(adapter_dirs, profile_dir):
    with pytest.raises(ValueError, match="not empty"):
        profile_adapters(adapter_dirs, profile_dir)


def test_rslora_scale(adapter_dirs):
    plain, rs = (read_adapter(d) for d in adapter_dirs)
    assert not plain.config.get("use_rslora") and rs.config["use_rslora"]
    assert all(m.scale == 16 / 8 for m in plain.modules)
    assert all(math.isclose(m.scale, 8 / math.sqrt(8)) for m in rs.modules)


@pytest.mark.parametrize("variant", PAPER_VARIANTS)
def test_variant_reproduces_the_papers_codes_only_average(adapter_dirs, profile_dir, variant):
    bits, rho = int(variant.split("@")[0]), float(variant.split("@")[1])
    alloc = solve_adapters(profile_dir, variant=variant).to_dict()
    code = solve_adapters(profile_dir, variant=variant, h_rule="code").to_dict()
    num = den = 0
    for adapter in (read_adapter(d) for d in adapter_dirs):
        a_num = a_den = 0
        for module in adapter.modules:
            h = _paper_high(torch.linalg.svdvals(module.delta()), rho)
            r = module.rank
            assert alloc["assignments"][f"{adapter.name}/{module.name}"] == f"lq{bits}-h{h}-g128"
            assert code["assignments"][f"{adapter.name}/{module.name}"] == f"lq{bits}-h{max(1, h - 1)}-g128"
            a_num += (h * bits + r - h) * (module.rows + module.cols)
            a_den += r * (module.rows + module.cols)
        assert math.isclose(alloc["adapters"][adapter.name]["bits_per_param_codes"], a_num / a_den, rel_tol=1e-12)
        num, den = num + a_num, den + a_den
    assert math.isclose(alloc["bits_per_param_codes"], num / den, rel_tol=1e-12)
    assert alloc["status"] == "fixed" and alloc["variant"] == variant and alloc["budget"] is None
    assert alloc["bits_per_param"] > alloc["bits_per_param_codes"]  # scales and zero points on top


def test_solver_beats_the_variant_at_its_own_bits(profile_dir):
    for variant in PAPER_VARIANTS:
        fixed = solve_adapters(profile_dir, variant=variant).to_dict()
        solved = solve_adapters(profile_dir, fixed["bits_per_param"]).to_dict()
        assert solved["status"] == "optimal"
        assert solved["bits_per_param"] <= fixed["bits_per_param"] * (1 + 1e-12)
        assert solved["objective"] <= fixed["objective"] * (1 + 1e-12)


def test_fleet_and_per_adapter_budgets(profile_dir):
    keys = {"budget", "bits_per_param", "bits_per_param_codes", "objective", "status", "gap", "seconds", "backend",
            "profile", "assignments"}
    fleet = solve_adapters(profile_dir, 1.9).to_dict()
    assert keys <= set(fleet) and fleet["mode"] == "fleet"
    assert fleet["bits_per_param"] <= 1.9 and fleet["status"] == "optimal"
    per = solve_adapters(profile_dir, 1.9, per_adapter=True).to_dict()
    assert per["mode"] == "per-adapter"
    for name, info in per["adapters"].items():
        assert info["bits_per_param"] <= 1.9 and info["status"] == "optimal"
    # one shared budget is at least as good as the same budget split evenly (same total bits allowed)
    assert fleet["objective"] <= per["objective"] * (1 + 1e-12)
    assert len(fleet["assignments"]) == sum(a["modules"] for a in fleet["adapters"].values())


def test_infeasible_budget_names_the_minimum(profile_dir):
    least = fleet_min_budget(profile_dir)
    prof = load_adapter_profile(profile_dir)
    cheapest = prof.table.groupby("index")["storage_bits"].min().sum() / prof.modules["params"].sum()
    assert math.isclose(least, cheapest)
    with pytest.raises(InfeasibleBudgetError, match=f"{least:.4f}"):
        solve_adapters(profile_dir, least * 0.99)
    with pytest.raises(InfeasibleBudgetError, match="adapter '(math|chat)' needs at least"):
        solve_adapters(profile_dir, least * 0.99, per_adapter=True)
    assert solve_adapters(profile_dir, least).to_dict()["bits_per_param"] <= least * (1 + 1e-12)


def test_variant_and_budget_exclude_each_other(profile_dir):
    with pytest.raises(ValueError, match="takes no --budget"):
        solve_adapters(profile_dir, 2.0, variant="2@0.8")
    with pytest.raises(ValueError, match="give a --budget"):
        solve_adapters(profile_dir)
    with pytest.raises(ValueError, match="'error_act' is empty.*--calib"):
        solve_adapters(profile_dir, 2.0, objective="act")


def test_edited_table_is_refused(profile_dir, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(profile_dir, copy)
    table = copy / "profile.csv"
    table.write_text(table.read_text().replace("lq2-h1-g32", "lq2-h2-g32", 1))
    with pytest.raises(ValueError, match="truncated or edited"):
        load_adapter_profile(copy)


def test_auto_backend_certifies_its_gap(profile_dir):
    from bitalloc.adapters.solve import AUTO_GAP

    for budget in (1.6, 2.2, 3.0):
        auto = solve_adapters(profile_dir, budget).to_dict()
        exact = solve_adapters(profile_dir, budget, backend="highs").to_dict()
        lag = solve_adapters(profile_dir, budget, backend="lagrange").to_dict()
        assert exact["status"] == "optimal" and lag["backend"] == "lagrange"
        assert auto["backend"] in ("lagrange", "highs")
        if auto["backend"] == "lagrange":
            assert lag["gap"] <= AUTO_GAP and auto["objective"] == lag["objective"]
        else:
            assert lag["gap"] > AUTO_GAP and auto["objective"] == pytest.approx(exact["objective"], rel=1e-9)
        assert lag["bound"] <= exact["objective"] * (1 + 1e-9) <= lag["objective"] * (1 + 1e-9)
        per = solve_adapters(profile_dir, budget, per_adapter=True).to_dict()
        assert set(per["backend"].split("+")) <= {"lagrange", "highs"}
    with pytest.raises(ValueError, match="unknown solver backend"):
        solve_adapters(profile_dir, 2.0, backend="gurobi")
