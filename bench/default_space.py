"""Choose the `default` config space by measurement, and show how it compares with `lqlora`.

1. Profile a *pool* of configs at rank 0 on the whole built-in model, with the Fisher
   estimate (WikiText-2 16 x 256 tokens when ``../shared/data`` has it, else ``self:16``):
   LQ-LoRA's grid (288 configs) plus blocks of 128 with fp16 second-level groups and plain
   fp16 scales (``s16``) at every block size. Rank 0 isolates the quantizer: a rank adds
   the same factor bits to every config, so the choice of quantizers carries over.
2. Greedy forward selection: start empty, add the pool config that most lowers the worst
   relative excess of the space's Lagrangian dual over the pool's, across prices spanning
   2.25-4.5 bits/param, for both the Fisher and the plain objective; stop at the first
   size whose worst excess is below ``--tolerance`` (default 1%).
3. Exact ILP sweeps (2.25:4.5:0.125) of the pool, `lqlora`, a hand-made 32-config grid (the
   space the `quality` report profiles), and the chosen set, both objectives: the objective
   relative to `lqlora`'s at every budget, and the extra bits/param each space needs to match `lqlora`.
4. Cost: the measured profile seconds of each space's rows (the profile records seconds per
   (matrix, config)), and with ``--rank-layers`` a rank-64 profile of those layers for
   `lqlora` and the chosen set, side by side.

``--pool families`` chooses over the union of code families instead: a pool of the NF-only
space that step 2 picks from LQ-LoRA's grid (:data:`NF_SPACE`), NF with fp16 scales, and the
integer family (:func:`int_pool`: int2/3/4/8 x blocks 16-128 x six scale options), on the
``--include`` layers; spaces are then compared with the NF-only space instead of `lqlora`
(which is not in that pool). Its report goes to ``reports/default_space/families/``.

Writes ``reports/default_space/results.json`` and ``results.md``; the profile lives in
``--work`` and is reused (and resumed) by later runs.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _profiles import finished_profile  # noqa: E402

from bitalloc.configs import LQLORA_GRID, QuantConfig, _expand_grid, config_space  # noqa: E402

log = logging.getLogger("bench.default_space")

BUDGETS = "2.25:4.5:0.125"
#: A hand-made 32-config grid (NF bits x blocks 16-128, 4/8-bit scales in groups of 256, fp16),
#: compared as "32-config grid": the space the `quality` report profiles.
GRID_32 = {
    "bits": (2, 3, 4, 8), "scale_bits": (4, 8), "scale_dtype": ("fp16",),
    "block": (16, 32, 64, 128), "scale_block": (256,),
}


#: The 24 NF configs step 2 picks from LQ-LoRA's grid (``reports/default_space/results.md``).
NF_SPACE = (
    "nf4-g64-s3x64-r0", "nf3-g16-s4x16-r0", "nf4-g32-s4x64-r0", "nf3-g32-s4x64-r0",
    "nf4-g16-s2x64-r0", "nf2-g16-s2x16-r0", "nf8-g32-s8x16-r0", "nf2-g16-s2x64-r0",
    "nf4-g16-s3x16-r0", "nf3-g32-s3x64-r0", "nf4-g16-s4x64-r0", "nf3-g16-s4x256-r0",
    "nf8-g64-s3x16-r0", "nf3-g32-s3x256-r0", "nf3-g16-s3x64-r0", "nf4-g16-s4x16-r0",
    "nf3-g32-s2x64-r0", "nf8-g64-s8x16-r0", "nf3-g64-s2x16-r0", "nf4-g32-s3x64-r0",
    "nf2-g16-s3x16-r0", "nf4-g16-s8x64-r0", "nf2-g16-s3x256-r0", "nf3-g64-s3x64-r0",
)
#: Scale options of the integer pool: fp16 steps, and double-quantized ones from 8 bits in groups
#: of 256 blocks down to 2 bits in groups of 16.
INT_SCALES = ((16, 1), (8, 256), (4, 64), (3, 64), (4, 16), (2, 16))


def int_pool() -> list[QuantConfig]:
    """The integer family's pool: int2/3/4/8 x blocks 16-128 x :data:`INT_SCALES` (rank 0)."""
    return [QuantConfig(family="int", bits=b, block=g, scale_bits=sb, scale_block=sg)
            for b in (2, 3, 4, 8) for g in (16, 32, 64, 128) for sb, sg in INT_SCALES]


def families_pool() -> list[QuantConfig]:
    """:data:`NF_SPACE`, NF with fp16 scales at blocks 16-128, and :func:`int_pool`."""
    pool = [QuantConfig.from_name(c) for c in NF_SPACE]
    pool += _expand_grid({"bits": (2, 3, 4, 8), "scale_bits": (16,), "block": (16, 32, 64, 128)}, (0,))
    return list({c.name: c for c in pool + int_pool()}.values())


def pool_configs() -> list[QuantConfig]:
    """LQ-LoRA's grid, blocks of 128, and plain fp16 scales at every block size (rank 0)."""
    pool = _expand_grid(LQLORA_GRID, (0,))
    pool += _expand_grid({"bits": (2, 3, 4, 8), "scale_bits": (3, 4, 8), "scale_dtype": ("fp16",),
                          "block": (128,), "scale_block": (64, 256)}, (0,))
    pool += _expand_grid({"bits": (2, 3, 4, 8), "scale_bits": (16,), "block": (16, 32, 64, 128)}, (0,))
    seen: dict[str, QuantConfig] = {}
    for c in pool:
        seen.setdefault(c.name, c)
    return list(seen.values())


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitalloc.cli", *args]


def _one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def make_profile(args: argparse.Namespace, work: Path) -> Path:
    """The rank-0 pool profile, with ``--jobs`` worker processes; resumed when it exists."""
    out = work / "pool-profile"
    if finished_profile(out):
        log.info("pool profile %s already complete", out)
        return out
    space_file = work / "pool.json"
    configs = families_pool() if args.pool == "families" else pool_configs()
    space_file.write_text(json.dumps([c.name for c in configs], indent=1))
    cmd = ["profile", "--space", str(space_file), "--ranks", "0", "--calib", args.calib,
           "--samples", str(args.samples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
           "--jobs", str(max(0, args.jobs)), "--out", str(out)]
    if args.include:
        cmd += ["--include", args.include]
    started = time.perf_counter()
    subprocess.run(_cli(*cmd), check=True, cwd=ROOT)
    (work / "pool-profile-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return out


# ----- selection ---------------------------------------------------------------------------------
class Pool:
    """Per-(matrix, config) errors and storage bits as dense arrays, for fast dual evaluations."""

    def __init__(self, df: pd.DataFrame) -> None:
        self.matrices = list(dict.fromkeys(df["matrix"]))
        self.configs = list(dict.fromkeys(df["config"]))
        m_ix = {m: i for i, m in enumerate(self.matrices)}
        c_ix = {c: j for j, c in enumerate(self.configs)}
        M, C = len(self.matrices), len(self.configs)
        self.bits = np.full((M, C), np.nan)
        self.err = {k: np.full((M, C), np.nan) for k in ("plain", "fisher")}
        self.seconds = np.full((M, C), np.nan)
        i = df["matrix"].map(m_ix).to_numpy()
        j = df["config"].map(c_ix).to_numpy()
        self.bits[i, j] = df["storage_bits"].to_numpy(float)
        self.err["plain"][i, j] = df["error"].to_numpy(float)
        self.err["fisher"][i, j] = df["error_fisher"].to_numpy(float)
        self.seconds[i, j] = df["seconds"].to_numpy(float)
        numel = df.drop_duplicates("matrix").set_index("matrix")
        self.numel = np.array([float(numel.loc[m, "rows"] * numel.loc[m, "cols"]) for m in self.matrices])
        if np.isnan(self.bits).any() or np.isnan(self.err["plain"]).any():
            raise ValueError("the pool profile does not cover every (matrix, config)")
        self.objectives = [k for k in ("fisher", "plain") if not np.isnan(self.err[k]).any()]

    def prices(self, objective: str, lo: float = 2.25, hi: float = 4.5, n: int = 40) -> np.ndarray:
        """Prices (error per stored bit) whose pool optima span ``lo``..``hi`` bits/param."""
        E, B = self.err[objective], self.bits
        grid = np.logspace(-12, 6, 400) * float(np.median(E / B))
        used = np.array([self._pick_bits(E, B, lam, np.ones(E.shape[1], bool)) for lam in grid])
        inside = grid[(used >= lo) & (used <= hi)]
        return np.geomspace(inside.min(), inside.max(), n)

    def _pick_bits(self, E, B, lam, mask) -> float:
        v = np.where(mask, E + lam * B, np.inf)
        j = v.argmin(axis=1)
        return float(B[np.arange(len(j)), j].sum() / self.numel.sum())

    def dual(self, objective: str, lams: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(g(λ), Σ error at the argmin)`` of the space ``mask`` at each price."""
        E, B = self.err[objective], self.bits
        V = E[:, :, None] + lams[None, None, :] * B[:, :, None]  # M x C x L
        V = np.where(mask[None, :, None], V, np.inf)
        j = V.argmin(axis=1)  # M x L
        g = V.min(axis=1).sum(axis=0)
        e = np.take_along_axis(E, j, axis=1).sum(axis=0)  # the errors picked, summed per price
        return g, e


def greedy_select(pool: Pool, tolerance: float, max_size: int) -> tuple[list[str], list[dict[str, Any]]]:
    """Forward selection on the worst relative dual excess over both objectives' price ranges."""
    C = len(pool.configs)
    lams = {k: pool.prices(k) for k in pool.objectives}
    full = {k: pool.dual(k, lams[k], np.ones(C, bool)) for k in pool.objectives}
    E = {k: pool.err[k] for k in pool.objectives}
    B = pool.bits
    # current best value per (matrix, price) of the chosen set, per objective
    cur = {k: np.full((len(pool.matrices), len(lams[k])), np.inf) for k in pool.objectives}
    chosen: list[int] = []
    trace = []
    while len(chosen) < max_size:
        best = None
        for c in range(C):
            if c in chosen:
                continue
            worst = 0.0
            for k in pool.objectives:
                v = E[k][:, c, None] + lams[k][None, :] * B[:, c, None]
                g = np.minimum(cur[k], v).sum(axis=0)
                excess = (g - full[k][0]) / full[k][1]
                worst = max(worst, float(excess.max()))
            if best is None or worst < best[0]:
                best = (worst, c)
        worst, c = best
        chosen.append(c)
        for k in pool.objectives:
            cur[k] = np.minimum(cur[k], E[k][:, c, None] + lams[k][None, :] * B[:, c, None])
        trace.append({"size": len(chosen), "added": pool.configs[c], "worst_dual_excess": worst})
        log.info("%2d configs: + %s, worst dual excess %.4f", len(chosen), pool.configs[c], worst)
        if worst <= tolerance:
            break
    return [pool.configs[c] for c in chosen], trace


# ----- evaluation --------------------------------------------------------------------------------
def sweep_space(df: pd.DataFrame, names: set[str], objective: str, budgets: str = BUDGETS) -> pd.DataFrame:
    from bitalloc.solvers.table import sweep_table

    sub = df[df["config"].isin(names)]
    raw = sweep_table(sub, budgets, objective=objective)
    frame = raw.frame()
    hull = raw.hull.sort_values("bits_per_param")
    return frame[["budget", "bits_per_param", "objective", "status"]].assign(
        hull_bits=[hull["bits_per_param"].to_numpy()] * len(frame),
        hull_obj=[hull["objective"].to_numpy()] * len(frame),
    )


def _hull(hull_bits: np.ndarray, hull_obj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(hull_bits)
    return np.asarray(hull_bits)[order], np.asarray(hull_obj)[order]


def hull_error(hull_bits: np.ndarray, hull_obj: np.ndarray, budget: float) -> float:
    """The hull's (Lagrangian lower bound's) error at ``budget`` bits/param."""
    b, e = _hull(hull_bits, hull_obj)
    if budget < b[0]:
        return float("inf")
    return float(np.interp(budget, b, e))


def bits_to_reach(hull_bits: np.ndarray, hull_obj: np.ndarray, target: float) -> float:
    """Bits/param on a (decreasing) hull where it reaches ``target`` error (linear between vertices)."""
    b, e = _hull(hull_bits, hull_obj)
    if target >= e[0]:
        return float(b[0])
    if target < e[-1]:
        return float("inf")
    k = int(np.searchsorted(-e, -target))  # first vertex with e <= target
    b0, b1, e0, e1 = b[k - 1], b[k], e[k - 1], e[k]
    return float(b0 + (e0 - target) / (e0 - e1) * (b1 - b0))


def compare(df: pd.DataFrame, spaces: dict[str, set[str]], objectives: list[str],
            reference: str = "lqlora") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for obj in objectives:
        sweeps = {name: sweep_space(df, names, obj) for name, names in spaces.items()}
        ref = sweeps[reference]
        rows = []
        for i, budget in enumerate(ref["budget"]):
            row: dict[str, Any] = {"budget": float(budget), "lqlora_objective": float(ref["objective"].iloc[i])}
            for name, sw in sweeps.items():
                o = float(sw["objective"].iloc[i])
                row[f"{name}/lqlora"] = o / row["lqlora_objective"] if np.isfinite(o) else None
                # extra bits/param this space's hull needs to reach lqlora's hull at this budget
                target = hull_error(ref["hull_bits"].iloc[0], ref["hull_obj"].iloc[0], float(budget))
                row[f"{name}_bits_to_match"] = bits_to_reach(sw["hull_bits"].iloc[0], sw["hull_obj"].iloc[0],
                                                             target) - float(budget)
            rows.append(row)
        out[obj] = rows
    return out


def space_seconds(pool: Pool, names: set[str]) -> float:
    cols = [j for j, c in enumerate(pool.configs) if c in names]
    return float(pool.seconds[:, cols].sum())


R64_BUDGETS = "5.0:7.0:0.125"  # rank-64 bf16 factors alone cost 2.2-4.5 bits/param on these shapes


def rank_profile_timing(args: argparse.Namespace, work: Path, chosen: list[str]) -> list[dict[str, Any]]:
    """``bitalloc profile --no-fisher --ranks 64`` of ``--rank-layers`` for lqlora and the chosen set.

    A finished run (its profile and ``timing.json``) is reused, so a rerun of the bench only
    redoes what changed.
    """
    from bitalloc.profiles import load_profile

    include = r"\.layers\.(" + "|".join(args.rank_layers.split(",")) + r")\."
    chosen_file = work / "chosen-r64.json"
    chosen_file.write_text(json.dumps([QuantConfig.from_name(c).replace(rank=64).name for c in chosen]))
    rows = []
    for label, space in (("chosen", str(chosen_file)), ("lqlora", "lqlora")):
        out = work / f"r64-{label}"
        timing = out.with_name(out.name + "-timing.json")
        cmd = _cli("-q", "profile", "--no-fisher", "--no-act", "--no-kl", "--space", space, "--ranks", "64", "--device", "cpu",
                   "--include", include, "--out", str(out))
        try:
            df, meta = load_profile(out)
            done = json.loads(timing.read_text())
            if meta.get("configs") != [c.name for c in config_space(space, ranks=(64,))] or done["include"] != include:
                raise ValueError("another space or layers")
        except Exception:  # noqa: BLE001 - absent, partial or stale: measure
            subprocess.run(["rm", "-rf", str(out)], check=True)
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=ROOT, env=_one_thread_env())
            done = {"wall_s": time.perf_counter() - t0, "load_before": load0, "load_after": os.getloadavg(),
                    "include": include, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            timing.write_text(json.dumps(done))
            df, _ = load_profile(out)
        sw = sweep_space(df, set(df["config"]), "plain", R64_BUDGETS)
        rows.append({"space": label, "configs": int(df["config"].nunique()), "matrices": int(df["matrix"].nunique()),
                     **{k: done[k] for k in ("wall_s", "load_before", "load_after", "date")},
                     "budgets": sw["budget"].tolist(), "objective": sw["objective"].tolist()})
    return rows


def prefix_tradeoff(df: pd.DataFrame, pool: Pool, chosen: list[str], sizes: list[int],
                    lq: set[str] | None = None) -> list[dict[str, Any]]:
    """Worst exact-ILP ratio to the reference space ``lq`` (default lqlora; both objectives) and
    rank-0 cost for the first k chosen configs."""
    lq = lq or {c.name for c in _expand_grid(LQLORA_GRID, (0,))}
    refs = {obj: sweep_space(df, lq, obj) for obj in pool.objectives}
    out = []
    for k in sizes:
        names = set(chosen[:k])
        row: dict[str, Any] = {"configs": k, "seconds_vs_lqlora": space_seconds(pool, names) / space_seconds(pool, lq)}
        for obj in pool.objectives:
            sw = sweep_space(df, names, obj)
            ratios = (sw["objective"].to_numpy(float) / refs[obj]["objective"].to_numpy(float))
            row[f"{obj}_worst"] = float(np.nanmax(np.where(np.isfinite(ratios), ratios, np.inf)))
            row[f"{obj}_median"] = float(np.median(ratios))
        out.append(row)
    return out


# ----- report ------------------------------------------------------------------------------------
def _fmt(v: Any, spec: str = ".4f") -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "—"
    return format(v, spec)


def write_report(out: Path, res: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1, default=float))
    L = ["# default_space: choosing the `default` config space by measurement", ""]
    L += [f"- date: {res['date']}", f"- command: `{res['command']}`", f"- machine: {res['machine']}",
          f"- pool profile: rank 0, {res['pool_size']} configs x {res['matrices']} matrices of the built-in model"
          + (f" (targets matching `{res['include']}`)" if res.get("include") else "") + ", "
          f"Fisher from `{res['calib']}` ({res['samples']} x {res['calib_seqlen']} tokens); "
          f"profile wall time {res['pool_profile_seconds']}", ""]
    L += ["## The chosen space", "", f"{len(res['chosen'])} configs (rank 0 names; `--ranks` sets the rank):", ""]
    L += [f"- `{c}`" for c in res["chosen"]] + [""]
    L += ["Greedy forward selection (worst relative excess of the space's Lagrangian dual over the pool's, "
          "over prices spanning 2.25-4.5 bits/param, Fisher and plain objectives):", "",
          "| size | added | worst dual excess |", "| ---: | --- | ---: |"]
    L += [f"| {t['size']} | `{t['added']}` | {t['worst_dual_excess']:.4f} |" for t in res["trace"]] + [""]
    if res.get("tradeoff"):
        objs = [k[: -len("_worst")] for k in res["tradeoff"][0] if k.endswith("_worst")]
        L += ["The first k configs of that ranking (exact ILP at 2.25:4.5:0.125, ratio to `lqlora`'s optimum):", "",
              "| k | rank-0 cost vs lqlora | " + " | ".join(f"{o}: worst / median" for o in objs) + " |",
              "| ---: | ---: |" + " ---: |" * len(objs)]
        for t in res["tradeoff"]:
            L.append(f"| {t['configs']} | {t['seconds_vs_lqlora']:.3f} | "
                     + " | ".join(f"{t[o + '_worst']:.4f} / {t[o + '_median']:.4f}" for o in objs) + " |")
        L.append("")
    L += ["## Spaces compared", "", "| space | configs | rank-0 profile CPU s (measured rows) | vs lqlora |",
          "| --- | ---: | ---: | ---: |"]
    lq = res["spaces"][res.get("reference", "lqlora")]["seconds"]
    for name, s in res["spaces"].items():
        L.append(f"| {name} | {s['configs']} | {s['seconds']:.1f} | {s['seconds'] / lq:.3f}x |")
    L.append("")
    for obj, rows in res["fronts"].items():
        names = [k[: -len("/lqlora")] for k in rows[0] if k.endswith("/lqlora")]
        L += [f"### Exact optimum relative to `lqlora`'s, objective `{obj}`", "",
              "Each cell: the space's exact ILP objective / lqlora's at the budget, and in brackets the "
              "extra bits/param the space's Lagrangian hull needs to reach lqlora's hull at that budget "
              "(negative = fewer).", "",
              "| budget | " + " | ".join(names) + " |", "| ---: |" + " ---: |" * len(names)]
        for r in rows:
            cells = [f"{_fmt(r[f'{n}/lqlora'])} ({_fmt(r[f'{n}_bits_to_match'], '+.3f')})" for n in names]
            L.append(f"| {r['budget']:.3f} | " + " | ".join(cells) + " |")
        worst = {n: max((r[f"{n}/lqlora"] or np.inf) for r in rows) for n in names}
        L += ["", "Worst ratio over budgets: " + ", ".join(f"{n} {_fmt(v)}" for n, v in worst.items()), ""]
    if res.get("rank64"):
        L += ["## Rank 64, side by side (`bitalloc profile --no-fisher --ranks 64`)", "",
              "| space | matrices | configs | wall s | measured | load before -> after |",
              "| --- | ---: | ---: | ---: | --- | --- |"]
        for r in res["rank64"]:
            L.append(f"| {r['space']} | {r['matrices']} | {r['configs']} | {r['wall_s']:.1f} | {r['date']} | "
                     f"{'/'.join(f'{x:.1f}' for x in r['load_before'])} -> {'/'.join(f'{x:.1f}' for x in r['load_after'])} |")
        a, b = res["rank64"]
        L += ["", f"Speedup of the chosen space: {b['wall_s'] / a['wall_s']:.1f}x.", "",
              "| budget | chosen / lqlora (plain, exact) |", "| ---: | ---: |"]
        for bud, oa, ob in zip(a["budgets"], a["objective"], b["objective"]):
            L.append(f"| {bud:.3f} | {_fmt(oa / ob if np.isfinite(oa) and np.isfinite(ob) else None)} |")
        L.append("")
    L += ["## Notes", "", *res["notes"], ""]
    text = "\n".join(L)
    if res.get("reference", "lqlora") != "lqlora":  # the spaces are compared with another reference
        text = text.replace("lqlora", res["reference"])
    (out / "results.md").write_text(text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=None, help="default: wikitext2 when ../shared/data has it, else self:16")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--include", default=None, help="only these targets (a regex), for smoke runs")
    p.add_argument("--jobs", type=int, default=0, help="profile worker processes (0: one per core)")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--max-size", type=int, default=24)
    p.add_argument("--size", type=int, default=None, help="keep the first N configs the selection ranked")
    p.add_argument("--rank-layers", default="0,15,29", help="layers for the rank-64 comparison ('' to skip)")
    p.add_argument("--pool", choices=("nf", "families"), default="nf",
                   help="nf: LQ-LoRA's grid and more NF configs; families: NF and integer codes (see above)")
    p.add_argument("--work", default=None, help="default .bench-cache/default_space[-families]")
    p.add_argument("--out", default=None, help="default reports/default_space[/families]")
    args = p.parse_args(argv)
    fam = args.pool == "families"
    args.work = args.work or str(ROOT / ".bench-cache" / ("default_space-families" if fam else "default_space"))
    args.out = args.out or str(ROOT / "reports" / "default_space" / ("families" if fam else ""))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.calib is None:
        data = ROOT.parent / "shared" / "data" / "wikitext2-valid.tokens"
        args.calib = "wikitext2" if data.exists() else "self:16"
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    prof = make_profile(args, work)
    from bitalloc.profiles import load_profile

    df, meta = load_profile(prof)
    pool = Pool(df)
    chosen, trace = greedy_select(pool, args.tolerance, args.max_size)
    reference = "NF-only space" if fam else "lqlora"
    lq = set(NF_SPACE) if fam else {c.name for c in _expand_grid(LQLORA_GRID, (0,))}
    grid32 = {c.name for c in _expand_grid(GRID_32, (0,))}
    tradeoff = prefix_tradeoff(df, pool, chosen, [k for k in (6, 8, 12, 16, 20, 24) if k <= len(chosen)], lq)
    chosen = chosen[: args.size] if args.size else chosen
    spaces = {"pool": set(pool.configs), reference: lq, "chosen": set(chosen)}
    if not fam:
        spaces["32-config grid"] = grid32
    fronts = compare(df, spaces, pool.objectives, reference)
    rank64 = rank_profile_timing(args, work, chosen) if args.rank_layers and not fam else []
    seconds_file = work / "pool-profile-seconds.txt"
    res = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "python bench/default_space.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, load average {os.getloadavg()}",
        "calib": args.calib, "samples": args.samples, "calib_seqlen": args.calib_seqlen,
        "pool_size": len(pool.configs), "matrices": len(pool.matrices),
        "pool_profile_seconds": (seconds_file.read_text().strip() + " s") if seconds_file.exists() else "reused",
        "chosen": chosen, "trace": trace, "reference": reference, "include": args.include,
        "spaces": {n: {"configs": len(s), "seconds": space_seconds(pool, s)} for n, s in spaces.items()},
        "fronts": fronts, "rank64": rank64, "tradeoff": tradeoff,
        "notes": [
            "Rank 0 isolates the quantizer; every rank adds the same factor bits to every config of a matrix.",
            "Profile seconds are those recorded per (matrix, config) row of the rank-0 pool profile "
            "(one quantize + error each), so they compare spaces measured in the same run.",
            f"Total bench wall time {time.perf_counter() - t0:.0f} s.",
        ],
    }
    write_report(Path(args.out), res)
    print(Path(args.out) / "results.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
