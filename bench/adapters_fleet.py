"""Fleet-scale LoRAQuant benchmark: many synthetic rank-16 adapters of SmolLM2-135M under one budget.

Each adapter has a LoRA module on every linear layer of the built-in model's 30 blocks
(q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536), rank 16, alpha 32.
Factors are Gaussian with a decaying spectrum: module m of adapter a gets ``B = G_b·diag(√σ)/√rows``,
``A = diag(√σ)·G_a/√cols`` with ``σ_k = c_m·(k + 1)^(-α_a)``, ``α_a ~ U(0.6, 1.6)`` per adapter and
``c_m ~ LogNormal(0, 0.5)`` per module, so ΔW's singular values follow σ up to the small
distortion of Gaussian factors. Seeded.

Steps, each timed: generate the factors; profile (the library's kernel
``bitalloc.adapters.profile_batch``: SVD split and the exact error of every config, batched by
shape; kept in memory, as the CSV table of a fleet this size would take gigabytes); solve one
fleet budget with ``bitalloc.solvers.solve`` (the call ``bitalloc adapter solve`` makes); the
paper's fixed rules ``b@ρ`` and the solver at the bits each reaches; the same budget per adapter.
Writes ``reports/adapters_fleet/results.md`` and ``results.json``.

Run: ``.venv/bin/python bench/adapters_fleet.py`` (``--adapters 20`` for a quick look).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.adapters import AdapterSpace, Variant, profile_batch  # noqa: E402
from bitalloc.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from bitalloc.solvers import solve  # noqa: E402

log = logging.getLogger("adapters_fleet")

LAYERS = 30
SHAPES = {  # (rows, cols) = (out_features, in_features) of SmolLM2-135M's linear layers
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
RANK = 16
ALPHA = 32.0
VARIANTS = ("2@0.8", "2@0.9", "3@0.8", "3@0.9")


def generate(kind: int, adapters: np.ndarray, alphas: np.ndarray, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Factors of module type ``kind`` in every layer of ``adapters``: A (n, r, cols), B (n, rows, r)."""
    rows, cols = list(SHAPES.values())[kind]
    gen = torch.Generator().manual_seed(seed * 1_000_003 + kind * 10_007 + int(adapters[0]))
    n = len(adapters) * LAYERS
    k = torch.arange(1, RANK + 1, dtype=torch.float32)
    alpha = torch.from_numpy(np.repeat(alphas[adapters], LAYERS)).float().unsqueeze(1)
    c = torch.exp(0.5 * torch.randn(n, 1, generator=gen))
    root = (c * k.pow(-alpha) / (ALPHA / RANK)).sqrt()  # the profile applies the scale s = alpha / r
    b = torch.randn(n, rows, RANK, generator=gen) * root.unsqueeze(1) / rows**0.5
    a = torch.randn(n, RANK, cols, generator=gen) * root.unsqueeze(2) / cols**0.5
    return a, b


def run(args: argparse.Namespace) -> dict[str, Any]:
    space = AdapterSpace(bits=tuple(args.bits), groups=tuple(args.groups))
    configs = space.configs(RANK)
    names = [c.name for c in configs]
    n_types = len(SHAPES)
    n_modules = args.adapters * LAYERS * n_types
    error = np.empty((n_modules, len(configs)))
    bits = np.empty_like(error)
    codes = np.empty_like(error)
    params = np.empty(n_modules)
    singular = np.empty((n_modules, RANK))
    adapter_of = np.empty(n_modules, dtype=np.int64)
    rng = np.random.default_rng(args.seed)
    alphas = rng.uniform(0.6, 1.6, size=args.adapters)
    t_gen = t_prof = 0.0
    t0 = time.perf_counter()
    done = 0
    chunk = max(1, args.batch // LAYERS)
    for kind, (rows, cols) in enumerate(SHAPES.values()):
        row_bits = np.array([c.storage_bits(rows, cols, RANK) for c in configs], dtype=np.float64)
        row_codes = np.array([c.code_bits(rows, cols, RANK) for c in configs], dtype=np.float64)
        for start in range(0, args.adapters, chunk):
            ids = np.arange(start, min(start + chunk, args.adapters))
            t = time.perf_counter()
            a, b = generate(kind, ids, alphas, args.seed)
            t_gen += time.perf_counter() - t
            t = time.perf_counter()
            err, sv, _ = profile_batch(a, b, torch.full((a.shape[0],), ALPHA / RANK, dtype=torch.float64), configs)
            t_prof += time.perf_counter() - t
            # module index: adapter-major, then layer, then type
            idx = (np.repeat(ids, LAYERS) * LAYERS + np.tile(np.arange(LAYERS), len(ids))) * n_types + kind
            error[idx], bits[idx], codes[idx] = err, row_bits, row_codes
            singular[idx] = sv.numpy()
            params[idx] = RANK * (rows + cols)
            adapter_of[idx] = np.repeat(ids, LAYERS)
            done += len(idx)
            elapsed = time.perf_counter() - t0
            log.info("%d / %d modules profiled, %.0f s, ETA %.0f s", done, n_modules, elapsed,
                     elapsed / done * (n_modules - done))
    total_params = float(params.sum())
    out: dict[str, Any] = {
        "adapters": args.adapters, "modules": n_modules, "configs": len(configs), "rank": RANK,
        "space": space.to_dict(), "params": total_params, "seed": args.seed,
        "seconds": {"generate": t_gen, "profile": t_prof},
        "profile_ms_per_module": 1e3 * t_prof / n_modules,
        "min_budget": float(np.nanmin(bits, axis=1).sum() / total_params),
    }

    def solved(budget: float, rows: np.ndarray | None = None, backend: str = "highs") -> dict[str, Any]:
        sel = slice(None) if rows is None else rows
        t = time.perf_counter()
        sol = solve(error[sel], bits[sel], params[sel], budget, time_limit=args.time_limit, mip_gap=args.mip_gap,
                    backend=backend)
        wall = time.perf_counter() - t
        r = np.arange(len(sol.choice))
        return {"budget": budget, "bits_per_param": sol.bits_per_param, "objective": sol.objective,
                "bits_per_param_codes": float(codes[sel][r, sol.choice].sum() / params[sel].sum()),
                "status": sol.status, "gap": sol.gap, "seconds": wall, "backend": backend,
                "candidates_after_pruning": sol.n_candidates_after_pruning, "timings": sol.timings}

    out["fleet"] = solved(args.budget)
    log.info("fleet solve at %.3f: %s", args.budget, out["fleet"])
    out["fleet_lagrange"] = solved(args.budget, backend="lagrange")
    log.info("fleet solve at %.3f, lagrange: %s", args.budget, out["fleet_lagrange"])
    col = {n: j for j, n in enumerate(names)}
    out["variants"] = []
    for text in VARIANTS:
        v = Variant.parse(text)
        if v.bits not in args.bits or v.group not in args.groups:
            continue
        choice = np.array([col[v.config(s).name] for s in singular])
        r = np.arange(n_modules)
        fixed = {"variant": text, "bits_per_param": float(bits[r, choice].sum() / total_params),
                 "bits_per_param_codes": float(codes[r, choice].sum() / total_params),
                 "objective": float(error[r, choice].sum())}
        fixed["solver"] = solved(fixed["bits_per_param"])
        out["variants"].append(fixed)
        log.info("variant %s: %s", text, fixed)
    if args.per_adapter:
        t = time.perf_counter()
        per = [solved(args.budget, np.flatnonzero(adapter_of == i)) for i in range(args.adapters)]
        out["per_adapter"] = {
            "budget": args.budget, "seconds": time.perf_counter() - t,
            "objective": float(sum(p["objective"] for p in per)),
            "bits_per_param": float(sum(p["bits_per_param"] * params[adapter_of == i].sum()
                                        for i, p in enumerate(per)) / total_params),
            "statuses": sorted({p["status"] for p in per}),
            "slowest_seconds": max(p["seconds"] for p in per),
        }
    return out


def render(res: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    """The markdown page."""
    f = res["fleet"]
    lines = [
        "# LoRAQuant adapters at fleet scale (synthetic)",
        "",
        f"{res['adapters']:,} synthetic rank-{res['rank']} LoRA adapters on SmolLM2-135M's shapes "
        f"(30 blocks x q, k, v, o, gate, up, down): {res['modules']:,} modules, {res['params']:,.0f} LoRA "
        f"parameters, {res['configs']} configs per module (b in {res['space']['bits']}, every h from 0 to "
        f"{res['rank']}, groups {res['space']['groups']}; everything stored is counted). Spectra decay as "
        "`c·(k+1)^(-α)` (see `bench/adapters_fleet.py`). One budget for the whole fleet.",
        "",
        "| step | seconds | notes |",
        "|---|---:|---|",
        f"| generate factors | {res['seconds']['generate']:.1f} | seeded Gaussian factors |",
        f"| profile (SVD split + exact error of every config) | {res['seconds']['profile']:.1f} | "
        f"{res['profile_ms_per_module']:.2f} ms per module, in memory |",
        f"| solve, one fleet budget of {f['budget']} bits/param | {f['seconds']:.2f} | status {f['status']}, gap "
        f"{f['gap']:.2g}, {f['candidates_after_pruning']:,} candidates after pruning |",
    ]
    if "fleet_lagrange" in res:
        g = res["fleet_lagrange"]
        lines.append(f"| solve, same budget, `lagrange` backend | {g['seconds']:.2f} | status {g['status']}, gap {g['gap']:.2g} |")
    if "per_adapter" in res:
        p = res["per_adapter"]
        lines.append(f"| solve, {res['adapters']:,} per-adapter budgets of {p['budget']} | {p['seconds']:.1f} | "
                     f"statuses {p['statuses']}, slowest {p['slowest_seconds']:.2f} s |")
    lines += [
        "",
        f"Fleet allocation at {f['budget']}: {f['bits_per_param']:.4f} bits/param everything counted, "
        f"{f['bits_per_param_codes']:.4f} codes only, total error {f['objective']:.6g}. "
        f"Cheapest allocation: {res['min_budget']:.4f} bits/param.",
    ]
    if "per_adapter" in res:
        p = res["per_adapter"]
        lines.append(f"The same budget held by each adapter on its own: total error {p['objective']:.6g} "
                     f"({p['objective'] / f['objective']:.3f}x the fleet budget's) at {p['bits_per_param']:.4f} bits/param.")
    if res["variants"]:
        lines += [
            "",
            "LoRAQuant's fixed rule (paper's h, group 128) against the solver at the bits the rule reaches:",
            "",
            "| variant | bits/param (all) | codes only | error | solver error at the same bits | ratio | solver s |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for v in res["variants"]:
            s = v["solver"]
            lines.append(f"| {v['variant']} | {v['bits_per_param']:.4f} | {v['bits_per_param_codes']:.4f} | "
                         f"{v['objective']:.6g} | {s['objective']:.6g} | {s['objective'] / v['objective']:.3f} | "
                         f"{s['seconds']:.2f} |")
    met = "met" if f["seconds"] < 10 else "missed"
    goal = [f"Goal: solve under 10 s: {met} by the exact `highs` solve ({f['seconds']:.1f} s, status {f['status']})"]
    if "fleet_lagrange" in res:
        g = res["fleet_lagrange"]
        goal.append(f"; the `lagrange` backend takes {g['seconds']:.1f} s with a proven gap of {g['gap']:.2g}")
    t = f.get("timings", {})
    if t:
        goal.append(". Time split of the exact solve: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items()
                                                                     if k not in ("total", "solve")))
    lines += ["", "".join(goal) + ".", "", "## Command and machine", "", f"`{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=2.0, help="fleet budget, bits per LoRA parameter")
    parser.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 8])
    parser.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[128])
    parser.add_argument("--batch", type=int, default=300, help="modules per profile batch")
    parser.add_argument("--time-limit", type=float, default=120.0, help="seconds per exact solve")
    parser.add_argument("--mip-gap", type=float, default=0.0, help="relative gap the exact solves accept")
    parser.add_argument("--no-per-adapter", dest="per_adapter", action="store_false")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "reports" / "adapters_fleet"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("bitalloc").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    res = run(args)
    res["seconds"]["total"] = time.perf_counter() - t0
    from importlib.metadata import version

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "note": "shared with other jobs while it ran", "python": platform.python_version(),
               "torch": torch.__version__, "numpy": np.__version__, "highspy": version("highspy"),
               "date": dt.date.today().isoformat()}
    res["machine"] = machine
    command = "python bench/adapters_fleet.py " + " ".join(sys.argv[1:])
    res["command"] = command.strip()
    out = Path(args.out)
    atomic_write_json(out / "results.json", res)
    atomic_write_bytes(out / "results.md", render(res, command.strip(), machine).encode())
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
