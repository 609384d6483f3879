"""Solver scale benchmark on a LLaMA-2-70B-shaped synthetic problem.

80 layers x (q, o: 8192x8192; k, v: 1024x8192; gate, up: 28672x8192; down: 8192x28672)
= 560 matrices, each with the 288 configs of ``config_space("lqlora", ranks=(64,))`` and
exact ``QuantConfig.storage_bits``. Errors follow a documented model (see
:func:`synthetic_errors`). Times ``solve`` (highs; with q/k/v and gate/up ties), a
46-budget sweep, PuLP's naive formulation, ``pulp-cbc`` and ``lagrange``; writes
``reports/solver_scale/results.md`` and ``results.json``.

Run: ``.venv/bin/python bench/solver_scale.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.configs import QuantConfig, config_space  # noqa: E402
from bitalloc.solvers import Solution, lagrange_hull, parse_budgets, solve, sweep, tie_groups  # noqa: E402

LAYERS = 80
SHAPES = {  # name: (rows, cols) of nn.Linear weights (out_features, in_features)
    "self_attn.q_proj": (8192, 8192),
    "self_attn.k_proj": (1024, 8192),
    "self_attn.v_proj": (1024, 8192),
    "self_attn.o_proj": (8192, 8192),
    "mlp.gate_proj": (28672, 8192),
    "mlp.up_proj": (28672, 8192),
    "mlp.down_proj": (8192, 28672),
}
#: Relative sensitivity of each matrix type (v and down are commonly the touchiest).
TYPE_SENSITIVITY = {
    "self_attn.q_proj": 0.6, "self_attn.k_proj": 0.6, "self_attn.v_proj": 1.6,
    "self_attn.o_proj": 1.2, "mlp.gate_proj": 0.9, "mlp.up_proj": 1.0, "mlp.down_proj": 1.5,
}
#: NF-b quantization noise relative to 2^(-2b) (NF levels are not uniform).
NF_FACTOR = {2: 1.35, 3: 1.12, 4: 1.0, 8: 1.0}
TIE_PATTERNS = [r"self_attn\.[qkv]_proj$", r"mlp\.(gate|up)_proj$"]


def matrices() -> tuple[list[str], np.ndarray, np.ndarray]:
    """Names, rows and cols of the 560 target matrices."""
    names, rows, cols = [], [], []
    for layer in range(LAYERS):
        for kind, (r, c) in SHAPES.items():
            names.append(f"model.layers.{layer}.{kind}")
            rows.append(r)
            cols.append(c)
    return names, np.array(rows), np.array(cols)


def storage_bits(configs: list[QuantConfig], rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Exact storage bits (M x C), computed once per distinct shape."""
    shapes = sorted(set(zip(rows.tolist(), cols.tolist())))
    per_shape = {s: np.array([cfg.storage_bits(*s) for cfg in configs], dtype=np.float64) for s in shapes}
    return np.stack([per_shape[(r, c)] for r, c in zip(rows.tolist(), cols.tolist())])


def synthetic_errors(
    names: list[str], configs: list[QuantConfig], rows: np.ndarray, cols: np.ndarray, seed: int = 0
) -> np.ndarray:
    """A plausible error model (M x C), seeded.

    error[m, c] = numel_m * s_m * (1 - rho_m) * NF_FACTOR[b] * 2^(-2b) * g(block) * h(scales) * noise

    * s_m: sensitivity = type factor * depth factor (1 + 1.5 e^(-layer/6), early layers
      matter more) * lognormal(0, 0.35) per matrix;
    * rho_m ~ U(0.05, 0.25): energy the rank-64 factors remove;
    * g(block) = ln(2 * block) / ln(32): absmax of a larger block is larger, so the step is;
    * h = 1 + 3 * 2^(-2 * scale_bits) * (1 + 0.15 * log2(scale_block / 16)) * (0.9 if fp32),
      for double-quantized scales (fewer scale bits and larger groups cost more);
    * noise ~ lognormal(0, 0.05) per (matrix, config).
    """
    rng = np.random.default_rng(seed)
    m = len(names)
    numel = (rows * cols).astype(np.float64)
    layer = np.array([int(n.split(".")[2]) for n in names])
    kind = [n.split(".", 3)[3] for n in names]
    sens = np.array([TYPE_SENSITIVITY[k] for k in kind]) * (1 + 1.5 * np.exp(-layer / 6.0))
    sens *= rng.lognormal(0.0, 0.35, m)
    rho = rng.uniform(0.05, 0.25, m)
    per_cfg = np.empty(len(configs))
    for j, cfg in enumerate(configs):
        g = math.log(2 * cfg.block) / math.log(32)
        if cfg.scale_bits == 16:
            h = 1.0
        else:
            h = 1 + 3 * 2.0 ** (-2 * cfg.scale_bits) * (1 + 0.15 * math.log2(cfg.scale_block / 16))
            h = 1 + (h - 1) * (0.9 if cfg.scale_dtype == "fp32" else 1.0)
        per_cfg[j] = NF_FACTOR[cfg.bits] * 2.0 ** (-2 * cfg.bits) * g * h
    noise = rng.lognormal(0.0, 0.05, (m, len(configs)))
    return (numel * sens * (1 - rho))[:, None] * per_cfg[None, :] * noise


def make_problem(seed: int = 0) -> dict[str, Any]:
    """The synthetic 70B problem as arrays."""
    configs = config_space("lqlora", ranks=(64,))
    names, rows, cols = matrices()
    return {
        "names": names,
        "configs": configs,
        "error": synthetic_errors(names, configs, rows, cols, seed),
        "bits": storage_bits(configs, rows, cols),
        "numel": (rows * cols).astype(np.float64),
    }


def naive_pulp(
    error: np.ndarray, bits: np.ndarray, numel: np.ndarray, budget: float, time_limit: float
) -> dict[str, Any]:
    """The textbook PuLP model: a variable per (matrix, config), lpSum loops, no pruning.

    Solved by HiGHS through PuLP to the same standard (relative gap 0).
    """
    import pulp

    t0 = time.perf_counter()
    m_count, c_count = error.shape
    prob = pulp.LpProblem("naive", pulp.LpMinimize)
    x = {
        (m, c): pulp.LpVariable(f"x_{m}_{c}", cat=pulp.LpBinary)
        for m in range(m_count) for c in range(c_count) if np.isfinite(error[m, c])
    }
    prob += pulp.lpSum(error[m, c] * x[m, c] for (m, c) in x)
    for m in range(m_count):
        prob += pulp.lpSum(x[m, c] for c in range(c_count) if (m, c) in x) == 1
    prob += pulp.lpSum(bits[m, c] * x[m, c] for (m, c) in x) <= budget * numel.sum()
    build = time.perf_counter() - t0
    prob.solve(pulp.HiGHS(msg=False, gapRel=0.0, timeLimit=time_limit))
    total = time.perf_counter() - t0
    choice = np.array([
        max(range(c_count), key=lambda c: (x[m, c].varValue or 0.0) if (m, c) in x else -1.0)
        for m in range(m_count)
    ])
    rows = np.arange(m_count)
    return {
        "seconds": total,
        "build_seconds": build,
        "objective": float(error[rows, choice].sum()),
        "bits_per_param": float(bits[rows, choice].sum() / numel.sum()),
        "status": f"{pulp.LpStatus[prob.status]} / {pulp.LpSolution[prob.sol_status]}",
        "n_variables": len(x),
    }


def timed(fn: Callable[[], Any], repeats: int) -> tuple[list[float], Any]:
    """Wall times of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return times, out


def machine_info() -> dict[str, Any]:
    import highspy
    import pulp

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "highspy": getattr(highspy, "__version__", None) or _dist_version("highspy"),
        "pulp": pulp.__version__,
        "platform": platform.platform(),
    }


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=2.85)
    parser.add_argument("--budgets", default="2.25:4.5:0.05")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of the fast runs")
    parser.add_argument("--sweep-repeats", type=int, default=3)
    parser.add_argument("--slow-repeats", type=int, default=1, help="repeats of the PuLP and plain-MIP runs")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds for each slow run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "solver_scale")
    args = parser.parse_args(argv)

    t_start = time.perf_counter()
    load_before = os.getloadavg()
    p = make_problem(args.seed)
    err, bits, numel, names = p["error"], p["bits"], p["numel"], p["names"]
    ties = tie_groups(names, TIE_PATTERNS)
    budget = args.budget
    budgets = parse_budgets(args.budgets)
    slow = args.slow_repeats
    res: dict[str, Any] = {
        "problem": {
            "matrices": len(names), "configs": len(p["configs"]), "params": float(numel.sum()),
            "ties": len(ties), "seed": args.seed,
            "min_budget": float(bits.min(axis=1).sum() / numel.sum()),
        }
    }
    print(f"problem: {len(names)} matrices x {len(p['configs'])} configs, "
          f"{numel.sum() / 1e9:.2f}B params, min budget {res['problem']['min_budget']:.4f}", flush=True)

    def run(name: str, fn: Callable[[], Any], repeats: int) -> Any:
        times, out = timed(fn, repeats)
        res[name] = {"times": times, "median_seconds": statistics.median(times)}
        if isinstance(out, Solution):
            d = out.to_dict()
            keys = ("objective", "bits_per_param", "status", "gap", "bound", "n_candidates",
                    "n_candidates_after_pruning", "n_candidates_active", "timings", "note")
            res[name].update({k: d[k] for k in keys})
        print(f"{name}: median {res[name]['median_seconds']:.3f}s over {repeats}", flush=True)
        return out

    ilp = run("highs", lambda: solve(err, bits, numel, budget), args.repeats)
    run("highs_ties", lambda: solve(err, bits, numel, budget, ties=ties), args.repeats)
    lag = run("lagrange", lambda: solve(err, bits, numel, budget, backend="lagrange"), args.repeats)
    res["lagrange"]["gap_to_ilp"] = (lag.objective - ilp.objective) / ilp.objective
    run("hull", lambda: lagrange_hull(err, bits, numel), args.repeats)
    res["hull"]["points"] = int(len(lagrange_hull(err, bits, numel)))

    sols = run("sweep", lambda: sweep(err, bits, numel, budgets), args.sweep_repeats)
    res["sweep"]["budgets"] = len(budgets)
    res["sweep"]["statuses"] = {s: sum(x.status == s for x in sols) for s in sorted({x.status for x in sols})}
    res["sweep"]["max_gap"] = max((x.gap for x in sols if x.feasible), default=None)
    res["sweep"]["slowest_budget_seconds"] = max(x.seconds for x in sols)
    objs = [x.objective for x in sols if x.feasible]
    res["sweep"]["monotone"] = all(b <= a * (1 + 1e-12) for a, b in zip(objs, objs[1:]))

    def check(name: str, out: Any) -> None:
        res[name]["gap_to_ilp"] = (out.objective - ilp.objective) / ilp.objective

    check("highs_plain_mip", run(
        "highs_plain_mip",
        lambda: solve(err, bits, numel, budget, core=False, time_limit=args.time_limit), slow))
    check("highs_unpruned", run(
        "highs_unpruned",
        lambda: solve(err, bits, numel, budget, core=False, prune=False, time_limit=args.time_limit), slow))
    check("pulp_highs", run("pulp_highs", lambda: solve(err, bits, numel, budget, backend="pulp-highs"), slow))
    check("pulp_cbc", run(
        "pulp_cbc",
        lambda: solve(err, bits, numel, budget, backend="pulp-cbc", time_limit=args.time_limit), slow))
    naive_times, naive = timed(lambda: naive_pulp(err, bits, numel, budget, args.time_limit), slow)
    res["naive_pulp_highs"] = dict(naive, times=naive_times, median_seconds=statistics.median(naive_times))
    res["naive_pulp_highs"]["gap_to_ilp"] = (naive["objective"] - ilp.objective) / ilp.objective
    print(f"naive_pulp_highs: median {res['naive_pulp_highs']['median_seconds']:.3f}s", flush=True)

    res["total_bench_seconds"] = time.perf_counter() - t_start
    res["machine"] = machine_info()
    res["machine"]["loadavg_before"] = [round(x, 2) for x in load_before]
    res["machine"]["loadavg_after"] = [round(x, 2) for x in os.getloadavg()]
    res["date"] = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    res["command"] = " ".join([".venv/bin/python", "bench/solver_scale.py", *(argv if argv is not None else sys.argv[1:])])
    res["settings"] = {"budget": budget, "budgets": args.budgets, "repeats": args.repeats,
                       "sweep_repeats": args.sweep_repeats, "slow_repeats": slow,
                       "time_limit": args.time_limit}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(_json(res), indent=2) + "\n")
    (args.out / "results.md").write_text(render_markdown(res))
    print(f"wrote {args.out / 'results.md'} in {res['total_bench_seconds']:.1f}s total", flush=True)
    return res


def _json(value: Any) -> Any:
    from bitalloc.solvers.solution import json_ready

    return json_ready(value)


def render_markdown(r: dict[str, Any]) -> str:
    base = r["highs"]["median_seconds"]

    def fmt_gap(value: Any) -> str:
        if value is None:
            return ""
        return "0" if value == 0 else f"{value:.2e}"

    def row(label: str, key: str, note: str = "") -> str:
        d = r[key]
        med = d["median_seconds"]
        to_ilp = fmt_gap(d.get("gap_to_ilp")) if "gap_to_ilp" in d else ""
        return (f"| {label} | {med:.3f} | {len(d['times'])} | {med / base:.1f}x | {d.get('status', '')} | "
                f"{fmt_gap(d.get('gap'))} | {to_ilp} | {note} |")

    p, sw, h = r["problem"], r["sweep"], r["highs"]
    naive = r["naive_pulp_highs"]
    lines = [
        "# Solver scale: LLaMA-2-70B-shaped synthetic problem",
        "",
        f"{p['matrices']} matrices (80 layers x q, k, v, o, gate, up, down) x {p['configs']} configs "
        f"(`config_space(\"lqlora\", ranks=(64,))`), {p['params'] / 1e9:.2f}B parameters, exact "
        f"`QuantConfig.storage_bits` (everything counted, rank-64 factors in bf16), errors from the "
        f"seeded model in `bench/solver_scale.py` (seed {p['seed']}). Cheapest allocation: "
        f"{p['min_budget']:.4f} bits/param. Budget {r['settings']['budget']} bits/param.",
        "",
        "Wall-clock medians over `repeats` runs; each run includes validation, tie grouping, dominance "
        "pruning, the Lagrangian hull, the core search and the MIP (build + solve). "
        "`gap` is the run's own proven gap; `vs optimum` is (objective - optimum) / optimum.",
        "",
        "| run | median s | repeats | vs `highs` | status | gap | vs optimum | notes |",
        "|---|---:|---:|---:|---|---|---|---|",
        row("`solve(..., backend=\"highs\")`", "highs",
            f"{h['n_candidates_after_pruning']} of {h['n_candidates']} candidates survive pruning; "
            f"the MIP gets {h['n_candidates_active']}"),
        row("`highs` with q/k/v and gate/up ties", "highs_ties",
            f"{p['ties']} ties; objective {r['highs_ties']['objective']:.6g}"),
        row("`lagrange`", "lagrange", "greedy on the hull + fill-in; LP bound"),
        row("`lagrange_hull` (whole hull)", "hull", f"{r['hull']['points']} vertices"),
        row(f"`sweep`, {sw['budgets']} budgets {r['settings']['budgets']}", "sweep",
            f"statuses {sw['statuses']}; monotone {sw['monotone']}; slowest budget "
            f"{sw['slowest_budget_seconds']:.2f}s"),
        row("`highs`, `core=False` (one MIP over all pruned candidates)", "highs_plain_mip",
            "no reduced-cost fixing, no core search"),
        row("`highs`, `core=False, prune=False`", "highs_unpruned", "every (matrix, config) a column"),
        row("`solve(..., backend=\"pulp-highs\")`", "pulp_highs", ""),
        row("`solve(..., backend=\"pulp-cbc\")`", "pulp_cbc", f"time limit {r['settings']['time_limit']:g}s"),
        f"| naive PuLP + HiGHS (variable per (m, c), `lpSum` loops, no pruning, gap 0) | "
        f"{naive['median_seconds']:.3f} | {len(naive['times'])} | {naive['median_seconds'] / base:.1f}x | "
        f"{naive['status']} | | {fmt_gap(naive['gap_to_ilp'])} | {naive['n_variables']} variables, "
        f"model build {naive['build_seconds']:.2f}s; time limit {r['settings']['time_limit']:g}s |",
        "",
        f"`highs` at {r['settings']['budget']}: objective {h['objective']:.10g}, achieved "
        f"{h['bits_per_param']:.6f} bits/param, status {h['status']}, gap {h['gap']}. "
        "Time split of its last run: " + ", ".join(f"{k} {v:.3f}s" for k, v in h["timings"].items()) + ".",
        "Goals: `solve` < 1 s, sweep of 46 budgets < 10 s. `vs optimum` is measured against the "
        "`highs` objective, the proven optimum.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in r["machine"].items()],
        f"- date: {r['date']}",
        f"- command: `{r['command']}`",
        f"- whole bench: {r['total_bench_seconds']:.1f} s",
        "",
        "The machine is shared: load averages above 1 mean other jobs held a core during the run, "
        "so these times are upper bounds for an idle machine.",
        "",
    ]
    return "\n".join(lines)


def rerender(out: Path = ROOT / "reports" / "solver_scale") -> None:
    """Rewrite results.md from results.json (a change of layout needs no rerun)."""
    (out / "results.md").write_text(render_markdown(json.loads((out / "results.json").read_text())))


if __name__ == "__main__":
    main()
