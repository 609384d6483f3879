"""Fleet-scale LoRAQuant benchmark: many synthetic rank-16 adapters of SmolLM2-135M under one budget.

Each adapter has a LoRA module on every linear layer of the built-in model's 30 blocks
(q, o: 576x576; k, v: 192x576; gate, up: 1536x576; down: 576x1536), rank 16, alpha 32.
Factors are Gaussian with a decaying spectrum: module m of adapter a gets ``B = G_b·diag(√σ)/√rows``,
``A = diag(√σ)·G_a/√cols`` with ``σ_k = c_m·(k + 1)^(-α_a)``, ``α_a ~ U(0.6, 1.6)`` per adapter and
``c_m ~ LogNormal(0, 0.5)`` per module, so ΔW's singular values follow σ up to the small
distortion of Gaussian factors. Seeded.

Steps, each timed (wall and CPU seconds): generate the factors; profile (the library's kernel
``bitalloc.adapters.profile_batch``: SVD split and the exact error of every config, batched by
shape; kept in memory, as the CSV table of a fleet this size would take gigabytes; ``--arrays``
keeps them in an .npz file to reuse); solve one fleet budget with
``bitalloc.adapters.solve_arrays`` (what ``bitalloc adapter solve`` runs: the ``auto`` backend),
with ``lagrange`` and with the exact ``highs`` MIP under ``--time-limit``; the paper's fixed rules
``b@ρ`` and the solver at the bits each reaches; the same budget per adapter. ``--fit`` also
profiles the ``-fit`` configs (least-squares scales and zeros) and compares them with min-max.
Writes ``results.md`` and ``results.json`` into ``--out`` (default ``reports/adapters_fleet``).

Run: ``.venv/bin/python bench/adapters_fleet.py`` (``--adapters 20`` for a quick look).
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.adapters import AdapterQuantConfig, AdapterSpace, Variant, profile_batch, solve_arrays  # noqa: E402
from bitalloc.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402

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


def profile_fleet(args: argparse.Namespace) -> dict[str, Any]:
    """Generate and profile the fleet: the solver's arrays, singular values and step times."""
    configs = fleet_space(args).configs(RANK)
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
    return {"error": error, "bits": bits, "codes": codes, "params": params, "singular": singular,
            "adapter_of": adapter_of, "names": np.array([c.name for c in configs]),
            "seconds": np.array([t_gen, t_prof])}


def load_or_profile(args: argparse.Namespace) -> dict[str, Any]:
    """The profiled arrays: read from ``args.arrays`` when it holds this fleet, else profiled (and saved there)."""
    key = f"{args.adapters}|{args.bits}|{args.groups}|{args.seed}" + ("|fit" if args.fit else "")
    path = Path(args.arrays) if args.arrays else None
    if path is not None and path.exists():
        with np.load(path) as data:
            if str(data["key"]) == key:
                log.info("profiled arrays read from %s", path)
                return {k: data[k] for k in data.files if k != "key"} | {"reused": True}
        log.info("%s holds another fleet; profiling", path)
    arrays = profile_fleet(args)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, key=np.array(key), **arrays)
    return arrays


def run(args: argparse.Namespace) -> dict[str, Any]:
    arrays = load_or_profile(args)
    error, bits, codes, params = arrays["error"], arrays["bits"], arrays["codes"], arrays["params"]
    singular, adapter_of, names = arrays["singular"], arrays["adapter_of"], [str(n) for n in arrays["names"]]
    t_gen, t_prof = (float(x) for x in arrays["seconds"])
    space = fleet_space(args)
    n_modules = error.shape[0]
    total_params = float(params.sum())
    plain = np.array([not n.endswith("-fit") for n in names])  # min-max configs
    out: dict[str, Any] = {
        "adapters": args.adapters, "modules": n_modules, "configs": len(names), "rank": RANK,
        "plain_configs": int(plain.sum()), "space": space.to_dict(), "params": total_params, "seed": args.seed,
        "seconds": {"generate": t_gen, "profile": t_prof},
        "profile_ms_per_module": 1e3 * t_prof / n_modules,
        "min_budget": float(np.nanmin(bits, axis=1).sum() / total_params),
        "profile_reused": bool(arrays.get("reused", False)),
    }

    def solved(budget: float, rows: np.ndarray | None = None, backend: str = "auto",
               cols: np.ndarray = plain) -> dict[str, Any]:
        sel = slice(None) if rows is None else rows
        e, b = error[sel][:, cols], bits[sel][:, cols]
        t, c = time.perf_counter(), time.process_time()
        sol, used = solve_arrays(e, b, params[sel], budget, backend=backend, time_limit=args.time_limit,
                                 mip_gap=args.mip_gap)
        wall, cpu = time.perf_counter() - t, time.process_time() - c
        r = np.arange(len(sol.choice))
        return {"budget": budget, "bits_per_param": sol.bits_per_param, "objective": sol.objective,
                "bound": sol.bound, "bits_per_param_codes": float(codes[sel][:, cols][r, sol.choice].sum()
                                                                  / params[sel].sum()),
                "status": sol.status, "gap": sol.gap, "seconds": wall, "cpu_seconds": cpu, "backend": backend,
                "used": used, "candidates_after_pruning": sol.n_candidates_after_pruning, "timings": sol.timings}

    out["fleet"] = solved(args.budget)
    log.info("fleet solve at %.3f: %s", args.budget, out["fleet"])
    out["fleet_lagrange"] = solved(args.budget, backend="lagrange")
    log.info("fleet solve at %.3f, lagrange: %s", args.budget, out["fleet_lagrange"])
    if args.exact:
        out["fleet_exact"] = solved(args.budget, backend="highs")
        log.info("fleet solve at %.3f, highs: %s", args.budget, out["fleet_exact"])
    col = {n: j for j, n in enumerate(names)}
    out["variants"] = []
    for text in VARIANTS:
        v = Variant.parse(text)
        if v.bits not in args.bits or v.group not in args.groups:
            continue
        cfgs = [v.config(s) for s in singular]
        choice = np.array([col[c.name] for c in cfgs])
        r = np.arange(n_modules)
        fixed = {"variant": text, "bits_per_param": float(bits[r, choice].sum() / total_params),
                 "bits_per_param_codes": float(codes[r, choice].sum() / total_params),
                 "objective": float(error[r, choice].sum())}
        fixed["solver"] = solved(fixed["bits_per_param"])
        if args.fit:
            fitted = np.array([col[c.replace(fit=True).name] for c in cfgs])
            fixed["objective_fit"] = float(error[r, fitted].sum())
            fixed["solver_fit"] = solved(fixed["bits_per_param"], cols=np.ones(len(names), dtype=bool))
        out["variants"].append(fixed)
        log.info("variant %s: %s", text, fixed)
    if args.fit:
        out["fit"] = fit_summary(error, names, args)
        out["fleet_fit"] = solved(args.budget, cols=np.ones(len(names), dtype=bool))
    if args.per_adapter:
        t = time.perf_counter()
        per = [solved(args.budget, np.flatnonzero(adapter_of == i), backend=args.per_adapter_backend)
               for i in range(args.adapters)]
        out["per_adapter"] = {
            "budget": args.budget, "seconds": time.perf_counter() - t, "backend": args.per_adapter_backend,
            "objective": float(sum(p["objective"] for p in per)),
            "bound": float(sum(p["bound"] for p in per)),
            "bits_per_param": float(sum(p["bits_per_param"] * params[adapter_of == i].sum()
                                        for i, p in enumerate(per)) / total_params),
            "statuses": sorted({p["status"] for p in per}),
            "used": sorted({p["used"] for p in per}),
            "max_gap": max(p["gap"] for p in per),
            "slowest_seconds": max(p["seconds"] for p in per),
        }
    return out


def fit_summary(error: np.ndarray, names: list[str], args: argparse.Namespace) -> list[dict[str, Any]]:
    """Total error of every fitted config against its min-max twin, over the fleet."""
    col = {n: j for j, n in enumerate(names)}
    rows = []
    for name in names:
        if not name.endswith("-fit"):
            continue
        twin = name[: -len("-fit")]
        cfg = AdapterQuantConfig.from_name(name)
        if cfg.high not in (1, 4, 8, 16):
            continue
        rows.append({"config": twin, "error": float(error[:, col[twin]].sum()),
                     "error_fit": float(error[:, col[name]].sum())})
    return rows


def fleet_space(args: argparse.Namespace) -> AdapterSpace:
    """The config space profiled: ``--bits`` x ``--groups``, every h; min-max and fitted with ``--fit``."""
    return AdapterSpace(bits=tuple(args.bits), groups=tuple(args.groups), fit=(False, True) if args.fit else (False,))


def _solve_cell(s: dict[str, Any]) -> str:
    return f"status {s['status']}, gap {s['gap']:.2g}, backend {s['used']}"


def render(res: dict[str, Any], command: str, machine: dict[str, Any]) -> str:
    """The markdown page."""
    f = res["fleet"]
    lines = [
        "# LoRAQuant adapters at fleet scale (synthetic)",
        "",
        f"{res['adapters']:,} synthetic rank-{res['rank']} LoRA adapters on SmolLM2-135M's shapes "
        f"(30 blocks x q, k, v, o, gate, up, down): {res['modules']:,} modules, {res['params']:,.0f} LoRA "
        f"parameters, {res['plain_configs']} min-max configs per module (b in {res['space']['bits']}, every h "
        f"from 0 to {res['rank']}, groups {res['space']['groups']}; everything stored is counted)"
        + (f", and as many with fitted scales (`-fit`), {res['configs']} in all" if "fit" in res else "")
        + ". Spectra decay as `c·(k+1)^(-α)` (see `bench/adapters_fleet.py`). One budget for the whole fleet; "
        "the solves below use the min-max configs unless a row says `-fit`. Wall seconds on the machine below "
        "(with its load), CPU seconds of this process beside them.",
        "",
        "| step | wall s | CPU s | notes |",
        "|---|---:|---:|---|",
        f"| generate factors | {res['seconds']['generate']:.1f} | | seeded Gaussian factors |",
        f"| profile (SVD split + exact error of every config) | {res['seconds']['profile']:.1f} | | "
        f"{res['profile_ms_per_module']:.2f} ms per module, in memory |",
        f"| solve, one fleet budget of {f['budget']} bits/param, `auto` (the default) | {f['seconds']:.2f} | "
        f"{f['cpu_seconds']:.2f} | {_solve_cell(f)}, {f['candidates_after_pruning']:,} candidates after pruning |",
    ]
    g = res["fleet_lagrange"]
    lines.append(f"| same budget, `lagrange` backend | {g['seconds']:.2f} | {g['cpu_seconds']:.2f} | {_solve_cell(g)} |")
    if "fleet_exact" in res:
        x = res["fleet_exact"]
        lines.append(f"| same budget, exact `highs` with a {res['time_limit']:g} s time limit | {x['seconds']:.2f} | "
                     f"{x['cpu_seconds']:.2f} | {_solve_cell(x)}; error {x['objective'] / f['objective']:.9f}x auto's |")
    if "per_adapter" in res:
        p = res["per_adapter"]
        lines.append(f"| {res['adapters']:,} per-adapter budgets of {p['budget']}, `{p['backend']}` | {p['seconds']:.1f} | | "
                     f"statuses {p['statuses']}, largest gap {p['max_gap']:.2g}, slowest {p['slowest_seconds']:.2f} s |")
    lines += [
        "",
        f"Fleet allocation at {f['budget']}: {f['bits_per_param']:.4f} bits/param everything counted, "
        f"{f['bits_per_param_codes']:.4f} codes only, total error {f['objective']:.6g}, certified lower bound "
        f"{f['bound']:.6g} (gap {f['gap']:.2g}). Cheapest allocation: {res['min_budget']:.4f} bits/param.",
    ]
    t = f.get("timings", {})
    if t:
        lines[-1] += " Time split of the `auto` solve: " + ", ".join(
            f"{k} {v:.2f} s" for k, v in t.items() if k not in ("total", "solve")) + "."
    if "per_adapter" in res:
        p = res["per_adapter"]
        lines.append(f"The same budget held by each adapter on its own: total error {p['objective']:.6g} "
                     f"({p['objective'] / f['objective']:.3f}x the fleet budget's; at least "
                     f"{p['bound'] / f['objective']:.3f}x by the per-adapter bounds) at {p['bits_per_param']:.4f} bits/param.")
    if res["variants"]:
        fit = "fit" in res
        lines += [
            "",
            "LoRAQuant's fixed rule (paper's h, group 128) against the solver at the bits the rule reaches:",
            "",
            "| variant | bits/param (all) | codes only | rule's error | solver's error | ratio | solver s |"
            + (" rule with `-fit` | solver with `-fit` |" if fit else ""),
            "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if fit else ""),
        ]
        for v in res["variants"]:
            s = v["solver"]
            row = (f"| {v['variant']} | {v['bits_per_param']:.4f} | {v['bits_per_param_codes']:.4f} | "
                   f"{v['objective']:.6g} | {s['objective']:.6g} | {s['objective'] / v['objective']:.3f} | "
                   f"{s['seconds']:.2f} |")
            if fit:
                row += (f" {v['objective_fit']:.6g} ({v['objective_fit'] / v['objective']:.3f}x) | "
                        f"{v['solver_fit']['objective']:.6g} ({v['solver_fit']['objective'] / v['objective']:.3f}x) |")
            lines.append(row)
    if "fit" in res:
        ff = res["fleet_fit"]
        lines += [
            "",
            "Least-squares scale/zero fit of the high groups (`-fit`, same storage): total error over the fleet "
            "of each config against its min-max twin:",
            "",
            "| config | min-max error | fitted error | ratio |",
            "|---|---:|---:|---:|",
        ]
        lines += [f"| {r['config']} | {r['error']:.6g} | {r['error_fit']:.6g} | {r['error_fit'] / r['error']:.3f} |"
                  for r in res["fit"]]
        lines += ["", f"With the fitted configs in the space, the fleet solve at {ff['budget']} reaches a total error of "
                  f"{ff['objective']:.6g}, {ff['objective'] / f['objective']:.3f}x the min-max space's."]
    met = "met" if f["seconds"] < 10 else "missed"
    lines += ["", f"Goal: solve under 10 s: {met} by the default `auto` solve ({f['seconds']:.1f} s wall, "
              f"{f['cpu_seconds']:.1f} s CPU, certified gap {f['gap']:.2g}).", "",
              "## Command and machine", "", f"`{command}`", ""]
    if res.get("profile_reused"):
        lines += ["The profiled arrays were read from `--arrays`; the generate and profile times are those of the "
                  "run that wrote them (the same code, `--threads 1`, on the same machine).", ""]
    lines += [f"- {k}: {v}" for k, v in machine.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", type=int, default=1000)
    parser.add_argument("--budget", type=float, default=2.0, help="fleet budget, bits per LoRA parameter")
    parser.add_argument("--bits", type=lambda s: [int(x) for x in s.split(",")], default=[2, 3, 4, 8])
    parser.add_argument("--groups", type=lambda s: [int(x) for x in s.split(",")], default=[128])
    parser.add_argument("--batch", type=int, default=300, help="modules per profile batch")
    parser.add_argument("--time-limit", type=float, default=60.0, help="seconds per exact solve")
    parser.add_argument("--mip-gap", type=float, default=0.0, help="relative gap the exact solves accept")
    parser.add_argument("--no-per-adapter", dest="per_adapter", action="store_false")
    parser.add_argument("--per-adapter-backend", default="lagrange", help="backend of the per-adapter solves")
    parser.add_argument("--no-exact", dest="exact", action="store_false", help="skip the exact highs fleet solve")
    parser.add_argument("--fit", action="store_true", help="also profile the fitted (-fit) configs and compare")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the profile")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--note", default=None, help="a line on the machine's state, for the report")
    parser.add_argument("--out", default=str(ROOT / "reports" / "adapters_fleet"))
    parser.add_argument("--arrays", default=None,
                        help="an .npz file (outside the repository) to keep the profiled arrays in and reuse")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("bitalloc").setLevel(logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_start = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    res = run(args)
    res["time_limit"] = args.time_limit
    res["seconds"]["total"] = time.perf_counter() - t0
    from importlib.metadata import version

    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               **({"note": args.note} if args.note else {}), "python": platform.python_version(),
               "torch": torch.__version__, "numpy": np.__version__, "highspy": version("highspy"),
               "date": dt.date.today().isoformat(),
               "load average at the start (1, 5, 15 min)": load_start,
               "load average at the end (1, 5, 15 min)": ", ".join(f"{x:.1f}" for x in os.getloadavg())}
    res["machine"] = machine
    command = "python bench/adapters_fleet.py " + shlex.join(sys.argv[1:])
    res["command"] = command.strip()
    out = Path(args.out)
    atomic_write_json(out / "results.json", res)
    atomic_write_bytes(out / "results.md", render(res, command.strip(), machine).encode())
    log.info("wrote %s", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
