"""Objective fidelity: which profile column predicts what an allocation costs the model?

On the built-in model (or ``--model``), one profile (``--profile``, else made in ``--work``):

* allocations: the solver's answer at each of ``--budgets`` for every objective the profile
  has (``plain``, ``fisher``, and ``act`` / ``kl`` when the profile has ``error_act`` /
  ``error_kl``; a line says which are not available), ``solve --refine`` answers when the
  installed ``bitalloc solve`` has that option, and ``--perturb`` random perturbations of the
  solved allocations (a few matrices moved one config up or down their ladder of configs a
  solver could pick, staying within ``--tolerance`` bits/param of the allocation they start from);
* each applied with :func:`bitalloc.apply_allocation` (what ``bitalloc apply`` runs), loaded
  with ``bitalloc.load`` and scored on ``--windows`` x ``--seqlen`` tokens of ``--data`` that
  share no token with the profile's calibration text: KL to the original (mean per position)
  and perplexity, both from one forward pass against cached reference log-probabilities;
* every allocation's predicted total under every objective column, and per objective the
  Spearman correlation of predicted total against measured KL, over all allocations and within
  ``--range`` bits/param.

Writes ``results.md``, ``measurements.csv`` and ``fidelity.png`` to ``--out``. Measurements are
cached in ``--work`` by the allocation's content and reused on a rerun (resumable).

    python bench/objective_fidelity.py              # the committed run (reports/objective_fidelity/)
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _fidelity_lib import (OBJECTIVES, available_objectives, calibration_spans, digest, disjoint_windows,  # noqa: E402
                           lookup, move_ladders, perturb, reference_logprobs, score, spearman, totals)
from _profiles import finished_profile  # noqa: E402

log = logging.getLogger("bench.objective_fidelity")
BUDGETS = (2.5, 2.75, 3.0, 3.25, 3.5, 4.0, 4.5)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bitalloc.cli", *args]


def _run(cmd: list[str]) -> str:
    log.info("$ %s", " ".join(cmd))
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


# ----- the profile ------------------------------------------------------------------------------------
def make_profile(args: argparse.Namespace, work: Path) -> Path:
    """``--profile`` as given, else a profile in ``work`` (made with `bitalloc profile`, resumed)."""
    if args.profile:
        return Path(args.profile)
    out = work / "profile"
    if not finished_profile(out):
        cmd = ["-q", "profile", "--space", args.space, "--ranks", args.ranks, "--calib", args.calib,
               "--samples", str(args.samples), "--seqlen", str(args.calib_seqlen), "--device", "cpu",
               "--out", str(out)]
        if args.model:
            cmd += ["--model", args.model]
        started = time.perf_counter()
        _run(_cli(*cmd))
        (work / "profile-seconds.txt").write_text(f"{time.perf_counter() - started:.1f}\n")
    return out


# ----- the allocations ----------------------------------------------------------------------------------
def refine_supported() -> bool:
    """Whether ``bitalloc solve`` takes ``--refine``."""
    return "--refine" in _run(_cli("solve", "--help"))


def plan(args: argparse.Namespace, profile_dir: Path, work: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """The allocations to measure (label, source, objective, budget, allocation dict) and notes."""
    import bitalloc
    from bitalloc.allocation import Allocation
    from bitalloc.profiles import load_profile
    from bitalloc.solvers import InfeasibleBudgetError

    df, meta = load_profile(profile_dir)
    avail = available_objectives(df)
    notes = [f"- `{name}` ({OBJECTIVES[name]}): not available, the profile has no `{OBJECTIVES[name]}` column"
             for name, column in avail.items() if column is None]
    columns = [c for c in avail.values() if c]
    table = lookup(df)
    entries: list[dict[str, Any]] = []
    for name, column in avail.items():
        if column is None:
            continue
        for budget in args.budgets:
            try:
                alloc = bitalloc.solve((df, meta), budget, objective=column)
            except InfeasibleBudgetError as err:
                notes.append(f"- sweep {name} at {budget}: infeasible ({str(err)[:100]})")
                continue
            entries.append({"label": f"sweep-{name}-{budget:.2f}", "source": "sweep", "objective": name,
                            "budget": budget, "alloc": alloc.to_dict()})
    entries += refined(args, profile_dir, work, avail, notes)
    # ladders from the plain and Fisher columns, one seeded generator per objective: adding an
    # objective to the profile adds its perturbations and keeps the others (and their cached measurements)
    ladders = move_ladders(df, [c for c in ("error", "error_fisher") if c in columns] or columns)
    for name in avail:
        sweeps = [e for e in entries if e["source"] == "sweep" and e["objective"] == name]
        bases = [e for e in sweeps if e["alloc"]["bits_per_param"] <= args.perturb_below + 1e-9] or sweeps
        rng = random.Random(f"{args.seed}:{name}")
        for k in range(args.perturb if bases else 0):
            base = bases[k % len(bases)]
            moves = rng.choice(args.moves)
            new = perturb(base["alloc"]["assignments"], ladders, table, rng, moves=moves,
                          target_bits=base["alloc"]["bits_per_param"], tolerance=args.tolerance)
            data = dict(base["alloc"], assignments=new, objective=None, bound=None, gap=None, status="perturbed",
                        note=f"{base['label']} with {moves} matrices moved one config", bits_histogram={},
                        bits_per_param=totals(table, new, [])["bits_per_param"])
            data.pop("params_by_bits", None)
            entries.append({"label": f"perturb-{name}-{k:02d}", "source": "perturbed", "objective": name,
                            "budget": base["budget"], "base": base["label"], "moves": moves,
                            "alloc": Allocation.from_dict(data).to_dict()})
    seen: set[str] = set()
    unique = []
    for e in entries:
        e["digest"] = digest(e["alloc"]["assignments"])
        e.update({f"pred_{n}": None for n in OBJECTIVES})
        t = totals(table, e["alloc"]["assignments"], columns)
        e["bits_per_param"] = t["bits_per_param"]
        for name, column in avail.items():
            if column:
                e[f"pred_{name}"] = t[column]
        if e["digest"] in seen:
            notes.append(f"- {e['label']}: the same allocation as one listed before it (measured once)")
        seen.add(e["digest"])
        unique.append(e)
    return unique, notes


def refined(args: argparse.Namespace, profile_dir: Path, work: Path, avail: dict[str, str | None],
            notes: list[str]) -> list[dict[str, Any]]:
    """``bitalloc solve --refine`` answers at ``--refine-budgets``, when the command has the option."""
    if not args.refine_budgets:
        return []
    if not refine_supported():
        notes.append("- refine: not available (`bitalloc solve` has no `--refine` option)")
        return []
    objective = "kl" if avail.get("kl") else "fisher"
    out = []
    for budget in args.refine_budgets:
        path = work / "refined" / f"{objective}-{budget:.2f}-n{args.refine}.json"
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            cmd = ["-q", "solve", str(profile_dir), "--budget", str(budget), "--objective", objective,
                   "--refine", str(args.refine), "--out", str(path), "--force"]
            started = time.perf_counter()
            try:
                _run(_cli(*cmd))
            except RuntimeError as err:
                notes.append(f"- refine at {budget}: failed ({str(err)[:200]})")
                continue
            path.with_suffix(".seconds").write_text(f"{time.perf_counter() - started:.1f}\n")
        out.append({"label": f"refine-{objective}-{budget:.2f}", "source": "refined", "objective": objective,
                    "budget": budget, "alloc": json.loads(path.read_text())})
    return out


# ----- measuring --------------------------------------------------------------------------------------------
def windows_for(args: argparse.Namespace, meta: dict[str, Any], tokenizer: Any) -> tuple[torch.Tensor, list[int], int]:
    """The evaluation windows (disjoint from the profile's calibration text), their starts, spans avoided."""
    from bitalloc.models.text import load_text

    ids = tokenizer(load_text(args.data), return_tensors="pt", verbose=False)["input_ids"][0]
    avoid = calibration_spans(meta.get("calibration"), args.data, ids.numel())
    windows, starts = disjoint_windows(ids, args.seqlen, args.windows, avoid)
    return windows, starts, len(avoid)


def measure_all(args: argparse.Namespace, entries: list[dict[str, Any]], meta: dict[str, Any], work: Path,
                ) -> dict[str, Any]:
    """Apply, load and score every allocation not measured before; returns the evaluation setup."""
    from bitalloc.apply import apply_allocation, load_model_or_applied, read_info
    from bitalloc.models import load_model

    done_path = work / "measured.jsonl"
    done = {}
    if done_path.exists():
        for line in done_path.read_text().splitlines():
            row = json.loads(line)
            done[row["key"]] = row
    original, tokenizer = load_model(args.model, device="cpu")
    windows, starts, avoided = windows_for(args, meta, tokenizer)
    key_base = f"{args.data}|{args.seqlen}|{','.join(map(str, starts))}"
    todo = [e for e in entries if f"{e['digest']}|{key_base}" not in done]
    setup = {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "starts": starts,
             "calibration_spans_avoided": avoided, "measured": len(todo)}
    reference = None
    if todo or f"original|{key_base}" not in done:
        reference = reference_logprobs(original, windows)
        if f"original|{key_base}" not in done:
            row = {"key": f"original|{key_base}", **score(original, windows, reference)}
            with done_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            done[row["key"]] = row
    setup["original"] = done[f"original|{key_base}"]
    del original
    for i, e in enumerate(todo):
        target = work / "models" / e["digest"]
        t0 = time.perf_counter()
        apply_allocation(e["alloc"], out=target, model=args.model, device="cpu", force=True, progress=False)
        t1 = time.perf_counter()
        model, _ = load_model_or_applied(str(target), device="cpu")
        measured = score(model, windows, reference)
        row = {"key": f"{e['digest']}|{key_base}", **measured, "applied_bits_per_param": read_info(target)["bits_per_param"],
               "apply_seconds": t1 - t0, "eval_seconds": time.perf_counter() - t1}
        del model
        shutil.rmtree(target, ignore_errors=True)
        with done_path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        done[row["key"]] = row
        log.info("[%d/%d] %-28s bits %.3f  kl %.4f  ppl %.2f  (%.0f s)", i + 1, len(todo), e["label"],
                 row["applied_bits_per_param"], row["kl"], row["perplexity"], time.perf_counter() - t0)
    for e in entries:
        e.update({k: v for k, v in done[f"{e['digest']}|{key_base}"].items() if k != "key"})
    return setup


# ----- the report --------------------------------------------------------------------------------------------
def correlations(entries: list[dict[str, Any]], low: tuple[float, float]) -> list[dict[str, Any]]:
    """Per objective with predictions: Spearman of predicted total against measured KL, overall and in ``low``."""
    out = []
    for name in OBJECTIVES:
        pts = [e for e in entries if e.get(f"pred_{name}") is not None and e.get("kl") is not None]
        if not pts:
            out.append({"objective": name, "available": False})
            continue
        band = [e for e in pts if low[0] - 1e-6 <= e["bits_per_param"] <= low[1] + 1e-6]
        out.append({"objective": name, "available": True, "n": len(pts), "n_low": len(band),
                    "overall": spearman([e[f"pred_{name}"] for e in pts], [e["kl"] for e in pts]),
                    "low": spearman([e[f"pred_{name}"] for e in band], [e["kl"] for e in band])})
    return out


FIELDS = ("label", "source", "objective", "budget", "base", "moves", "bits_per_param", "applied_bits_per_param",
          *(f"pred_{n}" for n in OBJECTIVES), "kl", "perplexity", "apply_seconds", "eval_seconds", "digest")


def _f(x: Any, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def write_report(args: argparse.Namespace, entries: list[dict[str, Any]], notes: list[str], setup: dict[str, Any],
                 meta: dict[str, Any], env: dict[str, Any], out: Path) -> list[dict[str, Any]]:
    """results.md, measurements.csv, fidelity.png; returns the correlations."""
    out.mkdir(parents=True, exist_ok=True)
    with (out / "measurements.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        for e in entries:
            writer.writerow({k: e.get(k) for k in FIELDS})
    corr = correlations(entries, args.range)
    _figure(entries, corr, out / "fidelity.png")
    (out / "correlations.json").write_text(json.dumps(corr, indent=1) + "\n")
    cal = meta.get("calibration") or {}
    orig = setup["original"]
    lo, hi = args.range
    lines = [
        "# objective fidelity: predicted total against measured KL", "",
        f"- command: `{env['command']}`", f"- machine: {env['machine']}",
        f"- load average (1 min) at start / end: {env['load_start']:.1f} / {env['load_end']:.1f}",
        f"- wall time: {env['seconds']:.0f} s ({env['measured']} allocations applied and scored in this run, "
        "the others read from the cache)",
        f"- model: {env['model']}; profile: space `{meta.get('space')}`, ranks {meta.get('ranks')}, calibration "
        f"{cal.get('samples')} x {cal.get('seqlen')} tokens of `{cal.get('source')}`",
        f"- scoring: {setup['windows']} windows x {setup['seqlen']} tokens of `{args.data}` (token offsets "
        f"{setup['starts']}), none sharing a token with the {setup['calibration_spans_avoided']} calibration "
        "windows; KL is the mean per position of KL(original || model), perplexity the GPTQ convention on the "
        f"same tokens (original: {orig['perplexity']:.3f})",
        "- every allocation is applied with `bitalloc.apply_allocation` (what `bitalloc apply` runs) and loaded "
        "with `bitalloc.load`: the measured model is the one `bitalloc apply` writes",
        f"- allocations: {len(entries)} ({sum(e['source'] == 'sweep' for e in entries)} solver answers at budgets "
        f"{', '.join(f'{b:g}' for b in args.budgets)}, {sum(e['source'] == 'refined' for e in entries)} refined, "
        f"{sum(e['source'] == 'perturbed' for e in entries)} random perturbations of solver answers at most "
        f"{args.perturb_below:g} bits: {', '.join(map(str, args.moves))} matrices moved one config, within "
        f"{args.tolerance:g} bits/param)",
        "- predicted total: the allocation's sum of the objective's column (every allocation under every column)",
        *notes, "",
        "![predicted total against measured KL](fidelity.png)", "",
        f"## Spearman correlation of predicted total against measured KL", "",
        f"| objective | allocations | all budgets | {lo:g}-{hi:g} bits/param (allocations) | goal (>= 0.95 / >= 0.9) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for c in corr:
        if not c["available"]:
            lines.append(f"| {c['objective']} | - | not available | not available | - |")
            continue
        met = (c["overall"] or -1) >= 0.95 and (c["low"] or -1) >= 0.9
        lines.append(f"| {c['objective']} | {c['n']} | {_f(c['overall'], '.3f')} | {_f(c['low'], '.3f')} "
                     f"({c['n_low']}) | {'met' if met else 'missed'} |")
    lines += ["", "## Allocations", "",
              "| allocation | from | bits/param | " + " | ".join(f"pred {n}" for n in OBJECTIVES)
              + " | KL | perplexity | apply s | eval s |",
              "| --- | --- | ---: | " + " | ".join("---:" for _ in OBJECTIVES) + " | ---: | ---: | ---: | ---: |"]
    for e in sorted(entries, key=lambda e: (e["bits_per_param"], e["label"])):
        src = e.get("base") and f"{e['base']} ({e['moves']} moves)" or e["source"]
        lines.append(f"| {e['label']} | {src} | {e['bits_per_param']:.4f} | "
                     + " | ".join(_f(e.get(f"pred_{n}"), ".4g") for n in OBJECTIVES)
                     + f" | {_f(e.get('kl'), '.4f')} | {_f(e.get('perplexity'), '.2f')} | "
                     f"{_f(e.get('apply_seconds'), '.1f')} | {_f(e.get('eval_seconds'), '.1f')} |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    return corr


def _figure(entries: list[dict[str, Any]], corr: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [c for c in corr if c["available"]]
    fig, axes = plt.subplots(1, max(1, len(shown)), figsize=(4.2 * max(1, len(shown)), 4.0), squeeze=False)
    markers = {"sweep": "o", "perturbed": "x", "refined": "*"}
    for ax, c in zip(axes[0], shown):
        name = c["objective"]
        for source, marker in markers.items():
            pts = [e for e in entries if e["source"] == source and e.get(f"pred_{name}") is not None
                   and e.get("kl") is not None]
            if pts:
                sc = ax.scatter([e[f"pred_{name}"] for e in pts], [e["kl"] for e in pts], marker=marker, s=28,
                                c=[e["bits_per_param"] for e in pts], cmap="viridis", vmin=2.5, vmax=4.5, label=source)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"predicted total ({OBJECTIVES[name]})")
        ax.set_title(f"{name}: Spearman {_f(c['overall'], '.3f')} (low {_f(c['low'], '.3f')})", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    axes[0][0].set_ylabel("measured KL to the original (nats/token)")
    if shown:
        fig.colorbar(sc, ax=axes[0].tolist(), label="bits/param")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model (default: the built-in smollm2-135m)")
    p.add_argument("--profile", default=None, help="an existing profile directory (else one is made in --work)")
    p.add_argument("--space", default="default")
    p.add_argument("--ranks", default="0,8,16")
    p.add_argument("--calib", default="wikitext2")
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--budgets", default=",".join(str(b) for b in BUDGETS))
    p.add_argument("--perturb", type=int, default=8, help="random perturbations of each objective's solver answers")
    p.add_argument("--perturb-below", type=float, default=3.5, help="perturb solver answers at most this many bits")
    p.add_argument("--moves", default="2,4,8", help="how many matrices a perturbation moves (one drawn each time)")
    p.add_argument("--tolerance", type=float, default=0.02, help="bits/param a perturbation may drift")
    p.add_argument("--refine", type=int, default=2, help="N of `solve --refine N` (when the command has it)")
    p.add_argument("--refine-budgets", default="2.5,3.0,3.25")
    p.add_argument("--range", default="2.5,3.25", help="the low-budget band of the second correlation")
    p.add_argument("--data", default="wikitext2")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", default=str(ROOT / ".bench-cache" / "objective_fidelity"))
    p.add_argument("--out", default=str(ROOT / "reports" / "objective_fidelity"))
    args = p.parse_args(argv)
    args.budgets = _floats(args.budgets)
    args.refine_budgets = _floats(args.refine_budgets)
    args.moves = [int(m) for m in _floats(args.moves)]
    args.range = tuple(_floats(args.range))
    if len(args.range) != 2 or args.range[0] > args.range[1]:
        p.error("--range is LOW,HIGH bits/param")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("bitalloc", "transformers", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    load_start = os.getloadavg()[0]
    started = time.perf_counter()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    from bitalloc.profiles import load_profile

    profile_dir = make_profile(args, work)
    entries, notes = plan(args, profile_dir, work)
    _, meta = load_profile(profile_dir)
    setup = measure_all(args, entries, meta, work)
    env = {
        "command": "python bench/objective_fidelity.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), cpu",
        "model": args.model or "smollm2-135m (built-in)",
        "load_start": load_start, "load_end": os.getloadavg()[0],
        "seconds": time.perf_counter() - started, "measured": setup["measured"],
    }
    corr = write_report(args, entries, notes, setup, meta, env, Path(args.out))
    for c in corr:
        if c["available"]:
            print(f"{c['objective']:>7}: Spearman {_f(c['overall'], '.3f')} overall ({c['n']}), "
                  f"{_f(c['low'], '.3f')} within {args.range[0]:g}-{args.range[1]:g} ({c['n_low']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
