"""Quality benchmark: does allocation pay? Perplexity of bitalloc models vs uniform baselines.

On the built-in model (or ``--model``): one Fisher profile (``--space``, ``--ranks``), then

* the original model;
* uniform baselines: NF4 and NF3 round-to-nearest with QLoRA/LQ-LoRA double quantization
  (``nf{4,3}-g64-s8x256-fp32``, rank 0), and uniform LQ (the same with ``--fixed-rank``);
* bitalloc at each budget, one model per ``--variants`` item ``OBJECTIVE:RANKS``: the objective
  (``plain``, ``fisher``, ``act``, ``kl``) with every matrix at ``--fixed-rank`` (``fixed``), with
  the rank chosen by the solver from ``--ranks`` (``solver``), or ``bitalloc solve --refine
  --refine-steps`` around the solver's answer (``refine``); by default ``plain:fixed``,
  ``fisher:fixed`` and ``fisher:solver``;

each applied with ``bitalloc apply`` (bits/param with everything stored counted) and evaluated
on WikiText-2 validation (GPTQ convention, ``--windows`` x ``--seqlen``), perplexity and KL to
the original. Writes ``results.{md,json}``, ``evals.jsonl`` and ``quality.png`` to ``--out``.

Work (profile, allocations, applied models, per-model results) goes to ``--work`` and is
resumed on a rerun. ``--jobs N`` runs the profile with N worker processes (`bitalloc profile
--jobs N`) and N applies at a time (one torch thread each); evaluation runs in this process on
``--device``.

    python bench/quality.py                      # the committed run (see reports/quality/)
    python bench/quality.py --quick              # a smoke run: two layers, 2 windows of 256
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _profiles import finished_profile  # noqa: E402

from bitalloc.configs import QuantConfig  # noqa: E402

log = logging.getLogger("bench.quality")
BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.25)
BASELINE_QUANT = ("nf4-g64-s8x256-fp32", "nf3-g64-s8x256-fp32")
OBJECTIVE_COLUMNS = {"plain": "error", "fisher": "error_fisher", "act": "error_act", "kl": "error_kl"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitalloc.cli", *args]


def _one_thread_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    log.info("$ %s", " ".join(cmd))
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


# ----- stage 1: the profile ------------------------------------------------------------------------
def make_profile(args: argparse.Namespace, work: Path) -> Path:
    """The profile, with ``--jobs`` worker processes (`bitalloc profile --jobs`); resumed when it exists."""
    out = Path(args.profile) if args.profile else work / "profile"
    if finished_profile(out):
        log.info("profile %s already complete", out)
        return out
    cmd = ["-q", "profile", "--space", args.space, "--ranks", args.ranks, "--calib", args.calib,
           "--samples", str(args.samples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
           "--jobs", str(max(1, args.jobs)), "--out", str(out)]
    if args.model:
        cmd += ["--model", args.model]
    if args.include:
        cmd += ["--include", args.include]
    started = time.perf_counter()
    _run(_cli(*cmd))
    log.info("profile took %.1f s", time.perf_counter() - started)
    (work / "profile-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return out


# ----- stage 2: what to evaluate ----------------------------------------------------------------------
def plan(args: argparse.Namespace, profile_dir: Path, work: Path) -> list[dict[str, Any]]:
    """One entry per model: label, kind, and either a uniform config or an allocation file."""
    import bitalloc
    from bitalloc.profiles import load_profile
    from bitalloc.solvers import InfeasibleBudgetError

    df, meta = load_profile(profile_dir)
    r = args.fixed_rank
    entries: list[dict[str, Any]] = [{"label": "original", "kind": "original"}]
    for quant in args.baselines:  # a name with -r{rank} is taken as it is; else at ranks 0 and --fixed-rank
        for rank in ((None,) if re.search(r"-r\d+(-lr8)?$", quant) else (0, r)):
            cfg = QuantConfig.from_name(quant if rank is None else f"{quant}-r{rank}")
            entries.append({"label": f"uniform-{cfg.name}", "kind": "uniform", "config": cfg.name, "rank": cfg.rank,
                            "rank_mode": "fixed"})
    fixed = df[df["rank"] == r]
    variants = [(o, f"fixed-r{r}" if k == "fixed" else k, fixed if k == "fixed" else df) for o, k in args.variants]
    alloc_dir = work / "allocs"
    alloc_dir.mkdir(parents=True, exist_ok=True)
    for budget in args.budgets:
        for objective, rank_mode, table in variants:
            label = f"bitalloc-{objective}-{rank_mode}-{budget:.2f}"
            entry = {"label": label, "kind": "bitalloc", "objective": objective, "rank_mode": rank_mode,
                     "budget": budget}
            if rank_mode == "refine" and not _selected(args, label) and not (alloc_dir / f"{label}.json").is_file():
                entries.append(entry)  # its refinement runs the model: left to a run whose --only selects it
                continue
            try:
                if rank_mode == "refine":
                    alloc = _refined(args, profile_dir, alloc_dir / f"{label}.json", budget, objective)
                else:
                    alloc = bitalloc.solve((table, meta), budget, objective=_objective(objective))
            except InfeasibleBudgetError as err:
                entry["infeasible"] = str(err)
                entries.append(entry)
                continue
            except (ValueError, RuntimeError) as err:  # a column the profile lacks, a command option missing
                entry["infeasible"] = f"not available: {err}"
                entries.append(entry)
                continue
            path = alloc.save(alloc_dir / f"{label}.json")
            entry.update(alloc=str(path), predicted=alloc.objective, solver_status=alloc.status,
                         solver_seconds=alloc.seconds)
            entries.append(entry)
    order = {("original", None): 0, ("uniform", None): 1}
    order.update({("bitalloc", o, k): 2 + i for i, (o, k, _) in enumerate(variants)})

    def priority(e: dict[str, Any]) -> int:  # what the goals need first, so a partial run answers them
        key = (e["kind"], e.get("objective"), e.get("rank_mode")) if e["kind"] == "bitalloc" else (e["kind"], None)
        return order[key]

    return sorted(entries, key=priority)


def _selected(args: argparse.Namespace, label: str) -> bool:
    """Whether ``--only`` (when given) selects the model ``label``."""
    return not args.only or re.search(args.only, label) is not None


def _objective(name: str) -> str:
    """What `bitalloc.solve` takes for an objective: its name where the library knows it, else its column."""
    from bitalloc.solvers.table import OBJECTIVE_COLUMNS as KNOWN

    return name if name in KNOWN else OBJECTIVE_COLUMNS[name]


def _refined(args: argparse.Namespace, profile_dir: Path, path: Path, budget: float, objective: str) -> Any:
    """`bitalloc solve --refine` at ``budget`` (written to ``path`` once, read after); its seconds in the note."""
    from bitalloc.allocation import Allocation

    if not path.is_file():
        started = time.perf_counter()
        _run(_cli("-q", "solve", str(profile_dir), "--budget", str(budget), "--objective", objective,
                  "--refine", str(args.refine_steps), "--out", str(path), "--force"))
        data = json.loads(path.read_text())
        data["seconds"] = time.perf_counter() - started  # the whole command: solves and measurements
        path.write_text(json.dumps(data, indent=1) + "\n")
    return Allocation.from_dict(json.loads(path.read_text()), str(path))


# ----- stage 3: apply ------------------------------------------------------------------------------------
def _apply_command(args: argparse.Namespace, e: dict[str, Any]) -> list[str]:
    cmd = ["-q", "apply", "--out", e["dir"], "--force", "--device", args.apply_device]
    cmd += ["--uniform", e["config"]] if e["kind"] == "uniform" else [e["alloc"]]
    if args.model:
        cmd += ["--model", args.model]
    if args.include and e["kind"] == "uniform":
        cmd += ["--include", args.include]
    return cmd


def apply_all(args: argparse.Namespace, entries: list[dict[str, Any]], work: Path) -> None:
    """Apply every model up front with ``--jobs`` processes (with one job, evaluate applies lazily)."""
    todo = []
    done = _done_labels(work)
    for e in entries:
        if e["kind"] == "original" or e.get("infeasible"):
            continue
        e["dir"] = str(work / "models" / e["label"])
        if (Path(e["dir"]) / "bitalloc.json").is_file() or e["label"] in done or args.jobs <= 1:
            continue
        if args.only and not re.search(args.only, e["label"]):  # not to be evaluated in this run
            continue
        todo.append(_apply_command(args, e))
    started = time.perf_counter()
    env = _one_thread_env() if args.jobs > 1 else None
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        list(pool.map(lambda c: _run(_cli(*c), env), todo))
    log.info("applied %d models in %.1f s", len(todo), time.perf_counter() - started)


def _done_labels(work: Path) -> dict[str, dict[str, Any]]:
    path = work / "results.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            done[row["label"]] = row
    return done


# ----- stage 4: evaluate -----------------------------------------------------------------------------------
def evaluate_all(args: argparse.Namespace, entries: list[dict[str, Any]], work: Path) -> list[dict[str, Any]]:
    from bitalloc.apply import load_model_or_applied, read_info
    from bitalloc.models import evaluate, load_model
    from bitalloc.models.text import load_text, token_windows

    done_path = work / "results.jsonl"
    done = _done_labels(work)
    device = args.device
    original, tokenizer = load_model(args.model, device=device)
    ids = token_windows(tokenizer, load_text(args.data), args.seqlen, args.windows)
    rows = []
    for e in entries:
        if e.get("infeasible"):
            rows.append(dict(e, bits_per_param=None, perplexity=None, kl=None))
            continue
        if args.only and not re.search(args.only, e["label"]) and e["label"] not in done:
            rows.append(dict(e, bits_per_param=None, perplexity=None, kl=None, not_evaluated=True))
            continue
        if e["label"] in done:
            rows.append(dict(e, **{k: v for k, v in done[e["label"]].items() if k not in e}))
            continue
        t0 = time.perf_counter()
        if e["kind"] == "original":
            model, bits = original, None
        else:
            if not (Path(e["dir"]) / "bitalloc.json").is_file():
                _run(_cli(*_apply_command(args, e)))
            model, _ = load_model_or_applied(e["dir"], device=device)
            bits = read_info(e["dir"])["bits_per_param"]
        reference = None if model is original or args.no_kl else original
        result = evaluate(model, tokenizer, ids, args.seqlen, None, kl_to=reference, progress=False)
        row = dict(e, bits_per_param=bits, perplexity=result["perplexity"], kl=result["kl"],
                   windows=result["windows"], seqlen=args.seqlen, tokens=result["tokens"],
                   eval_seconds=time.perf_counter() - t0, baseline=e["kind"] != "bitalloc")
        if e["kind"] != "original":
            info = read_info(e["dir"])
            row["apply_seconds"] = info["seconds"]
            row["bits_per_param_on_disk"] = info["bits_per_param_on_disk"]
            del model
            if not args.keep_models:
                shutil.rmtree(e["dir"], ignore_errors=True)
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        log.info("%-40s bits %s  ppl %.3f  kl %s", e["label"], "-" if bits is None else f"{bits:.3f}",
                 row["perplexity"], "-" if row["kl"] is None else f"{row['kl']:.4f}")
        rows.append(row)
    return rows


# ----- stage 5: the report -----------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _seconds(value: Any) -> str:
    """A recorded duration: ``"126.6"`` reads ``126.6 s``; a description is kept as it is."""
    text = str(value)
    return f"{text} s" if re.fullmatch(r"\d+(\.\d*)?", text) else text


def verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """The two quality goals, checked on the measured rows."""
    orig = next(r["perplexity"] for r in rows if r["kind"] == "original")
    uniform = [r for r in rows if r["kind"] == "uniform" and r.get("perplexity") is not None]
    ours = [r for r in rows if r["kind"] == "bitalloc" and r["objective"] == "fisher" and r["rank_mode"] == "solver"]
    lines = []
    for r in ours:
        if r.get("perplexity") is None:
            why = "not evaluated yet" if r.get("not_evaluated") else f"infeasible ({r.get('infeasible', '')[:80]})"
            lines.append(f"- budget {r['budget']:.2f}: {why}")
            continue
        loss = r["perplexity"] - orig
        richer = [u for u in uniform if u["bits_per_param"] >= r["bits_per_param"] - 1e-9]
        if not richer:
            lines.append(f"- budget {r['budget']:.2f} ({r['bits_per_param']:.3f} bits): loss {loss:.3f}; "
                         "no uniform baseline has as many bits, nothing to compare")
            continue
        best = min(richer, key=lambda u: u["perplexity"])
        ok = loss <= 0.5 * (best["perplexity"] - orig)
        lines.append(f"- budget {r['budget']:.2f} ({r['bits_per_param']:.3f} bits): perplexity loss {loss:.3f} vs "
                     f"{best['perplexity'] - orig:.3f} for the best uniform baseline with at least as many bits "
                     f"({best['label']}, {best['bits_per_param']:.3f} bits): **{'met' if ok else 'missed'}** "
                     f"(goal: at most half, i.e. {0.5 * (best['perplexity'] - orig):.3f})")
    for r in ours:  # the same comparison by KL to the original (less noisy than perplexity differences)
        if r.get("kl") is None:
            continue
        richer = [u for u in uniform if u["bits_per_param"] >= r["bits_per_param"] - 1e-9 and u.get("kl") is not None]
        if richer:
            best = min(richer, key=lambda u: u["kl"])
            lines.append(f"- (KL) budget {r['budget']:.2f}: KL {r['kl']:.4f} vs {best['kl']:.4f} ({best['label']}): "
                         f"{'at most half' if r['kl'] <= 0.5 * best['kl'] else 'more than half'}")
    for r in ours:  # at or below the best uniform baseline (any family) with at least as many bits
        richer = [u for u in uniform if r.get("perplexity") is not None and u["bits_per_param"] >= r["bits_per_param"] - 1e-9]
        if richer:
            best = min(richer, key=lambda u: u["perplexity"])
            lines.append(f"- (at or below) budget {r['budget']:.2f}: {r['perplexity']:.3f} vs {best['perplexity']:.3f} "
                         f"({best['label']}): **{'met' if r['perplexity'] <= best['perplexity'] else 'missed'}**")
    at = [r for r in ours if r.get("budget") == 3.25 and r.get("perplexity") is not None]
    nf4 = [u for u in uniform if u.get("config") == f"{BASELINE_QUANT[0]}-r0"]
    if at and nf4:
        ok = at[0]["perplexity"] <= nf4[0]["perplexity"]
        lines.append(f"- 3.25 bits vs uniform NF4 ({nf4[0]['bits_per_param']:.3f} bits): {at[0]['perplexity']:.3f} vs "
                     f"{nf4[0]['perplexity']:.3f}: **{'met' if ok else 'missed'}**")
    return lines


def objective_verdicts(rows: list[dict[str, Any]]) -> list[str]:
    """Issue goals per objective and rank mode: KL at least 25% below the Fisher objective's at each
    budget 2.5-3.5, no collapse at 2.5 (perplexity under twice the original's), and at 3.25
    perplexity no worse than uniform NF4 (rank 0)."""
    orig = next(r["perplexity"] for r in rows if r["kind"] == "original")
    nf4 = next((u for u in rows if u.get("config") == f"{BASELINE_QUANT[0]}-r0" and u.get("perplexity")), None)
    ours = [r for r in rows if r["kind"] == "bitalloc" and r.get("perplexity") is not None]
    fisher = {r["budget"]: r for r in ours if r["objective"] == "fisher" and r["rank_mode"] == "solver"}
    lines = []
    for variant in sorted({(r["objective"], r["rank_mode"]) for r in ours}):
        pts = {r["budget"]: r for r in ours if (r["objective"], r["rank_mode"]) == variant}
        name = f"{variant[0]}, rank {variant[1]}"
        low = [b for b in sorted(pts) if 2.5 <= b <= 3.5 and b in fisher and pts[b].get("kl") is not None]
        if variant != ("fisher", "solver") and low:
            cut = [1 - pts[b]["kl"] / fisher[b]["kl"] for b in low]
            lines.append(f"- {name}: KL vs the Fisher objective at " + ", ".join(
                f"{b:g}: {100 * c:+.0f}%".replace("+-", "-") for b, c in zip(low, cut)) + " (lower is +): "
                + ("**met**" if all(c >= 0.25 for c in cut) and len(low) == 5 else "**missed**")
                + " (goal: at least 25% lower at each of 2.5, 2.75, 3.0, 3.25, 3.5)")
        if 2.5 in pts:
            ppl = pts[2.5]["perplexity"]
            lines.append(f"- {name}: 2.5 bits perplexity {ppl:.3f} vs twice the original {2 * orig:.3f}: "
                         f"**{'met' if ppl < 2 * orig else 'missed'}**")
        if 3.25 in pts and nf4:
            ppl = pts[3.25]["perplexity"]
            lines.append(f"- {name}: 3.25 bits perplexity {ppl:.3f} vs uniform NF4 ({nf4['bits_per_param']:.3f} bits) "
                         f"{nf4['perplexity']:.3f}: **{'met' if ppl <= nf4['perplexity'] else 'missed'}**")
    return lines


def write_report(args: argparse.Namespace, rows: list[dict[str, Any]], out: Path, env: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"env": env, "rows": rows}, indent=1) + "\n")
    with (out / "evals.jsonl").open("w") as f:
        for r in rows:
            if r.get("perplexity") is not None:
                f.write(json.dumps({k: r.get(k) for k in ("label", "kind", "baseline", "bits_per_param", "perplexity",
                                                          "kl", "budget", "objective", "rank_mode", "config")}) + "\n")
    _figure(rows, out / "quality.png")
    orig = next(r for r in rows if r["kind"] == "original")
    lines = [
        "# quality: bitalloc allocations vs uniform quantization on the built-in model", "",
        f"- date: {env['date']}", f"- command: `{env['command']}`", f"- machine: {env['machine']}",
        f"- model: {env['model']}; profile: space `{args.space}`, ranks {args.ranks}, Fisher from "
        f"{args.samples} x {args.calib_seqlen} tokens of `{args.calib}`; profile wall time {_seconds(env.get('profile_seconds'))}",
        f"- evaluation: `{args.data}`, {orig.get('windows')} windows x {args.seqlen} tokens "
        f"({orig.get('tokens')} predicted tokens), GPTQ convention; KL is the mean per-token KL(original || model)",
        "- bits/param: everything stored for the targets (codes, scales, second-level scales, low-rank factors)",
        f"- wall time of this run: {env['seconds']:.0f} s (the benchmark resumes where it stopped; each model's "
        "apply and eval seconds are in the table)",
        "- KL: " + ("not measured (`--no-kl`)" if args.no_kl else "measured"), "",
        "![perplexity against bits per parameter](quality.png)", "",
        "## Goals", "", *verdicts(rows), "", "## Objective goals", "", *objective_verdicts(rows), "",
        "## All models", "",
        "| model | kind | objective | rank | budget | bits/param | perplexity | KL | predicted error | solve s | apply s | eval s |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['kind']} | {r.get('objective') or '-'} | {r.get('rank_mode') or '-'} | "
                     f"{_fmt(r.get('budget'), '.2f')} | {_fmt(r.get('bits_per_param'), '.4f')} | "
                     f"{_fmt(r.get('perplexity'))} | {_fmt(r.get('kl'), '.4f')} | {_fmt(r.get('predicted'), '.4g')} | "
                     f"{_fmt(r.get('solver_seconds'), '.2f')} | {_fmt(r.get('apply_seconds'), '.1f')} | {_fmt(r.get('eval_seconds'), '.1f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    orig = next(r["perplexity"] for r in rows if r["kind"] == "original")
    ax.axhline(orig, color="k", ls=":", label=f"original ({orig:.2f})")
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r["kind"] == "bitalloc" and r.get("perplexity") is not None:
            groups.setdefault(f"bitalloc {r['objective']}, rank {r['rank_mode']}", []).append(r)
    for name, pts in groups.items():
        pts.sort(key=lambda r: r["bits_per_param"])
        ax.plot([r["bits_per_param"] for r in pts], [r["perplexity"] for r in pts], marker="o", label=name)
    for r in rows:
        if r["kind"] == "uniform" and r.get("perplexity") is not None:
            ax.scatter([r["bits_per_param"]], [r["perplexity"]], marker="s", s=50, zorder=3,
                       label=f"uniform {r['config']}")
    ax.set_yscale("log")
    cap = 20 * orig  # a destroyed model (NF2 everywhere) must not flatten the rest: list it instead
    off = [r for r in rows if r.get("perplexity") is not None and r["perplexity"] > cap]
    if off:
        ax.set_ylim(top=cap)
        ax.text(0.02, 0.98, "off scale: " + ", ".join(f"{r['label']} ({r['perplexity']:.3g})" for r in off),
                transform=ax.transAxes, va="top", fontsize=8, color="#aa0000")
    ax.set_xlabel("bits per parameter (targets, everything stored)")
    ax.set_ylabel("WikiText-2 perplexity (log scale)")
    ax.set_title("Perplexity against bits/param: bitalloc vs uniform")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=130, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--space", default="default")
    p.add_argument("--ranks", default="0,8,16,32")
    p.add_argument("--fixed-rank", type=int, default=8)
    p.add_argument("--baselines", default=",".join(BASELINE_QUANT),
                   help="uniform baselines (apply --uniform), comma-separated; a name without -r{rank} runs at "
                        "ranks 0 and --fixed-rank, e.g. nf4-g64-s8x256-fp32-r0,int4-g64-s16-r0,int3-g64-s16-r0")
    p.add_argument("--profile", default=None, help="use this profile directory (made there when absent)")
    p.add_argument("--variants", default="plain:fixed,fisher:fixed,fisher:solver",
                   help="OBJECTIVE:RANKS items: objective plain|fisher|act|kl, ranks fixed|solver|refine")
    p.add_argument("--refine-steps", type=int, default=2, help="N of `bitalloc solve --refine N` (refine variants)")
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--include", default=None, help="only these targets (a regex), for smoke runs")
    p.add_argument("--device", default="auto", help="where evaluation (and the Fisher pass) runs")
    p.add_argument("--apply-device", default="cpu")
    p.add_argument("--jobs", type=int, default=max(1, min(os.cpu_count() or 1, 14)))
    p.add_argument("--work", default=str(ROOT / ".bench-cache" / "quality"))
    p.add_argument("--out", default=str(ROOT / "reports" / "quality"))
    p.add_argument("--keep-models", action="store_true")
    p.add_argument("--no-kl", action="store_true", help="perplexity only (KL doubles the evaluation time)")
    p.add_argument("--only", default=None, metavar="REGEX",
                   help="evaluate only models whose label matches (others are reported when already measured); "
                        "a refine variant is refined only at the budgets it selects")
    p.add_argument("--quick", action="store_true", help="smoke run: layers 0-1, 2 windows of 256, 3 budgets")
    args = p.parse_args(argv)
    if args.quick:
        args.include = args.include or r"layers\.[01]\."
        args.windows, args.seqlen, args.samples, args.calib_seqlen = 2, 256, 4, 128
        args.budgets = "3.0,3.5,4.25"
        args.ranks = "0,8"
        args.work = str(Path(args.work).with_name("quality-quick"))
        args.out = str(Path(args.work) / "report")
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.baselines = [b.strip() for b in args.baselines.split(",") if b.strip()]
    args.variants = [tuple(v.split(":")) for v in args.variants.split(",")]
    if any(len(v) != 2 or v[0] not in OBJECTIVE_COLUMNS or v[1] not in ("fixed", "solver", "refine") for v in args.variants):
        p.error("--variants: comma-separated OBJECTIVE:RANKS, objective plain|fisher|act|kl, ranks fixed|solver|refine")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("bitalloc", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    profile_dir = make_profile(args, work)
    entries = plan(args, profile_dir, work)
    apply_all(args, entries, work)
    rows = evaluate_all(args, entries, work)
    seconds_file = work / "profile-seconds.txt"
    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}, eval on {args.device}"
                   + (f" ({torch.cuda.get_device_name()})" if args.device.startswith("cuda") else "")
                   + f", {args.jobs} parallel jobs for profile shards and applies (cpu, 1 thread each)",
        "model": args.model or "smollm2-135m (built-in)",
        "profile_seconds": seconds_file.read_text().strip() if seconds_file.exists() else "(reused)",
        "seconds": time.perf_counter() - started,
    }
    write_report(args, rows, Path(args.out), env)
    print("\n".join(verdicts(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
