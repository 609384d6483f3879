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
import shlex
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

from _fidelity_lib import (OBJECTIVES, Substitution, available_objectives, calibration_spans, digest,  # noqa: E402
                           disjoint_windows, lookup, move_ladders, perturb, reference_logprobs, score, spearman,
                           totals)
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
    template = next(e["alloc"] for e in entries if e["source"] == "sweep")
    for config in args.uniform:
        assignments = {t["name"]: config for t in meta["targets"]}
        data = dict(template, assignments=assignments, objective=None, bound=None, gap=None, status="uniform",
                    note=f"every target {config}", bits_histogram={}, bits_per_param=uniform_bits(meta, config))
        data.pop("params_by_bits", None)
        entries.append({"label": f"uniform-{config}", "source": "uniform", "objective": None, "budget": None,
                        "alloc": Allocation.from_dict(data).to_dict()})
    seen: set[str] = set()
    unique = []
    for e in entries:
        e["digest"] = digest(e["alloc"]["assignments"])
        e.update({f"pred_{n}": None for n in OBJECTIVES})
        if e["source"] == "uniform":  # configs outside the profile: no prediction
            e["bits_per_param"] = e["alloc"]["bits_per_param"]
        else:
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


def uniform_bits(meta: dict[str, Any], config: str) -> float:
    """Bits/param, everything stored, of every target at ``config``."""
    from bitalloc.configs import QuantConfig

    cfg = QuantConfig.from_name(config, allow_unusual=True)
    stored = sum(cfg.storage_bits(t["rows"], t["cols"]) for t in meta["targets"])
    return stored / sum(t["rows"] * t["cols"] for t in meta["targets"])


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
    """Score every allocation not measured before (this ``--shard``'s share); returns the evaluation setup.

    Rank-0 allocations are scored by in-memory substitution (:class:`Substitution`, the weights
    ``bitalloc apply`` writes, checked once against a real apply and load: ``--verify-apply``);
    others, and all with ``--no-substitute``, are applied with ``bitalloc.apply_allocation`` and loaded.
    """
    from bitalloc.apply import apply_allocation, load_model_or_applied, read_info
    from bitalloc.models import Calibration, calibration_fisher, find_targets, load_model

    done_path = work / "measured.jsonl"
    done = _read_done(done_path)
    original, tokenizer = load_model(args.model, device="cpu")
    windows, starts, avoided = windows_for(args, meta, tokenizer)
    key_base = f"{args.data}|{args.seqlen}|{','.join(map(str, starts))}"
    todo = [e for e in entries if f"{e['digest']}|{key_base}" not in done]
    shard, shards = args.shard
    todo = todo[shard - 1 :: shards]
    verify_key = f"verify|{key_base}"
    setup = {"windows": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "starts": starts,
             "calibration_spans_avoided": avoided, "measured": len(todo)}
    need_original = f"original|{key_base}" not in done and shard == 1
    need_verify = args.verify_apply and verify_key not in done and shard == 1
    reference = reference_logprobs(original, windows) if todo or need_original or need_verify else None
    if need_original:
        _append(done_path, done, {"key": f"original|{key_base}", **score(original, windows, reference)})
    sub = None
    if (todo or need_verify) and not args.no_substitute:
        targets = find_targets(original, include=meta.get("include"), exclude=meta.get("exclude"))
        fisher = None
        if meta.get("fisher") and meta.get("calibration"):
            from bitalloc.identity import model_id

            fisher = calibration_fisher(original, tokenizer, targets, Calibration.from_dict(meta["calibration"]),
                                        model_id=model_id(meta.get("model")), model_hash=meta["model_hash"],
                                        seed=int(meta.get("seed") or 0), device="cpu", progress=False)
        sub = Substitution(original, targets, fisher, seed=0)
    if need_verify and sub is not None:
        e = next(e for e in entries if e["source"] == "sweep" and Substitution.supports(e["alloc"]["assignments"]))
        target = work / "models" / f"verify-{e['digest']}"
        t0 = time.perf_counter()
        apply_allocation(e["alloc"], out=target, model=args.model, device="cpu", force=True, progress=False)
        loaded, _ = load_model_or_applied(str(target), device="cpu")
        sub.install(e["alloc"]["assignments"])
        row = {"key": verify_key, "label": e["label"], "max_abs_difference": sub.max_difference(loaded),
               "kl_applied": score(loaded, windows, reference)["kl"], "kl_substituted": score(original, windows, reference)["kl"],
               "seconds": time.perf_counter() - t0}
        del loaded
        shutil.rmtree(target, ignore_errors=True)
        _append(done_path, done, row)
        log.info("apply check on %s: max |difference| %g, KL %.6f applied vs %.6f substituted", e["label"],
                 row["max_abs_difference"], row["kl_applied"], row["kl_substituted"])
    for i, e in enumerate(todo):
        t0 = time.perf_counter()
        if sub is not None and Substitution.supports(e["alloc"]["assignments"]):
            sub.install(e["alloc"]["assignments"])
            t1 = time.perf_counter()
            measured = score(original, windows, reference)
            row = {"mode": "substituted", "applied_bits_per_param": e["bits_per_param"]}
        else:
            target = work / "models" / e["digest"]
            apply_allocation(e["alloc"], out=target, model=args.model, device="cpu", force=True, progress=False)
            t1 = time.perf_counter()
            model, _ = load_model_or_applied(str(target), device="cpu")
            measured = score(model, windows, reference)
            row = {"mode": "applied", "applied_bits_per_param": read_info(target)["bits_per_param"]}
            del model
            shutil.rmtree(target, ignore_errors=True)
        row.update({"key": f"{e['digest']}|{key_base}", **measured, "apply_seconds": t1 - t0,
                    "eval_seconds": time.perf_counter() - t1})
        _append(done_path, done, row)
        log.info("[%d/%d] %-28s bits %.3f  kl %.4f  ppl %.2f  (%.0f s)", i + 1, len(todo), e["label"],
                 e["bits_per_param"], row["kl"], row["perplexity"], time.perf_counter() - t0)
    done = _read_done(done_path)  # the other shards' rows too
    setup["original"] = done.get(f"original|{key_base}")
    setup["verify"] = done.get(verify_key)
    for e in entries:
        e.update({k: v for k, v in done.get(f"{e['digest']}|{key_base}", {}).items() if k != "key"})
    return setup


def _read_done(path: Path) -> dict[str, dict[str, Any]]:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[row["key"]] = row
    return done


def _append(path: Path, done: dict[str, Any], row: dict[str, Any]) -> None:
    with path.open("a") as f:  # one short line per write: shards append to one file
        f.write(json.dumps(row) + "\n")
    done[row["key"]] = row


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
          *(f"pred_{n}" for n in OBJECTIVES), "kl", "perplexity", "mode", "apply_seconds", "eval_seconds", "digest")


def budget_goals(entries: list[dict[str, Any]], original_ppl: float) -> list[str]:
    """The solver answers per budget and objective on the scoring windows, the uniform baselines,
    and the issue's goals checked on them."""
    sweeps = [e for e in entries if e["source"] in ("sweep", "refined") and e.get("kl") is not None]
    names = [n for n in (*OBJECTIVES, *sorted({e["objective"] for e in sweeps if e["source"] == "refined"}))
             if any(e["objective"] == n and e["source"] == "sweep" for e in sweeps)]
    variants = [(n, "sweep") for n in names] + sorted({(e["objective"], "refined") for e in sweeps
                                                       if e["source"] == "refined"})
    budgets = sorted({e["budget"] for e in sweeps})
    at = {(e["objective"], e["source"], e["budget"]): e for e in sweeps}
    head = " | ".join(f"{n}{' refined' if src == 'refined' else ''} KL / ppl" for n, src in variants)
    lines = [f"| budget | {head} |", "| ---: | " + " | ".join("---:" for _ in variants) + " |"]
    for b in budgets:
        cells = [f"{at[(n, src, b)]['kl']:.4f} / {at[(n, src, b)]['perplexity']:.2f}" if (n, src, b) in at else "-"
                 for n, src in variants]
        lines.append(f"| {b:g} | " + " | ".join(cells) + " |")
    uniform = [e for e in entries if e["source"] == "uniform" and e.get("kl") is not None]
    lines += ["", "| uniform baseline | bits/param | KL | perplexity |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {e['label']} | {e['bits_per_param']:.4f} | {e['kl']:.4f} | {e['perplexity']:.2f} |" for e in uniform]
    nf4 = next((e for e in uniform if e["label"].startswith("uniform-nf4")), None)
    lines += ["", f"Goals on these windows (original perplexity {original_ppl:.2f}):", ""]
    for n, src in variants:
        name = f"{n}{' refined' if src == 'refined' else ''}"
        low = [b for b in budgets if 2.5 <= b <= 3.5 and (n, src, b) in at and ("fisher", "sweep", b) in at]
        if (n, src) != ("fisher", "sweep") and low:
            cut = [1 - at[(n, src, b)]["kl"] / at[("fisher", "sweep", b)]["kl"] for b in low]
            ok = all(c >= 0.25 for c in cut) and len(low) == len([b for b in budgets if 2.5 <= b <= 3.5])
            lines.append(f"- {name}: KL below the Fisher objective's by " + ", ".join(
                f"{100 * c:.0f}% at {b:g}" for b, c in zip(low, cut)) + f": **{'met' if ok else 'missed'}** "
                "(goal: at least 25% at every budget 2.5-3.5)")
        if (n, src, 2.5) in at:
            ppl = at[(n, src, 2.5)]["perplexity"]
            lines.append(f"- {name}: perplexity at 2.5 bits {ppl:.2f} vs twice the original {2 * original_ppl:.2f}: "
                         f"**{'met' if ppl < 2 * original_ppl else 'missed'}**")
        if (n, src, 3.25) in at and nf4:
            ppl = at[(n, src, 3.25)]["perplexity"]
            lines.append(f"- {name}: perplexity at 3.25 bits {ppl:.2f} vs uniform NF4 ({nf4['bits_per_param']:.3f} "
                         f"bits) {nf4['perplexity']:.2f}: **{'met' if ppl <= nf4['perplexity'] else 'missed'}**")
    return lines


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
        _mode_line(entries, setup),
        f"- allocations: {len(entries)} ({sum(e['source'] == 'sweep' for e in entries)} solver answers at budgets "
        f"{', '.join(f'{b:g}' for b in args.budgets)}, {sum(e['source'] == 'refined' for e in entries)} refined, "
        f"{sum(e['source'] == 'perturbed' for e in entries)} random perturbations of solver answers at most "
        f"{args.perturb_below:g} bits: {', '.join(map(str, args.moves))} matrices moved one config, within "
        f"{args.tolerance:g} bits/param)",
        "- predicted total: the allocation's sum of the objective's column (every allocation under every column)",
        *notes, "",
        "![predicted total against measured KL](fidelity.png)", "",
        "## Spearman correlation of predicted total against measured KL", "",
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
    lines += ["", "## Solver answers per budget, and uniform baselines, on the scoring windows", "",
              *budget_goals(entries, orig["perplexity"])]
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


def write_quality(args: argparse.Namespace, entries: list[dict[str, Any]], setup: dict[str, Any],
                  meta: dict[str, Any], env: dict[str, Any], out: Path) -> None:
    """The quality table per objective (solver answers at each budget against uniform baselines) on
    the scoring windows, with profile, calibration and solve time: ``out``/results.md and quality.png."""
    out.mkdir(parents=True, exist_ok=True)
    orig = setup["original"]
    cal = meta.get("calibration") or {}
    sweeps = [e for e in entries if e["source"] in ("sweep", "refined") and e.get("kl") is not None]
    solve = {}
    for e in sweeps:
        solve.setdefault(f"{e['objective']}{' refined' if e['source'] == 'refined' else ''}", []).append(
            e["alloc"].get("seconds") or 0.0)
    lines = [
        "# quality per objective: solver answers against uniform baselines", "",
        f"- command: `{env['command']}` (written with `--quality-out`)", f"- machine: {env['machine']}",
        f"- load average (1 min) at start / end: {env['load_start']:.1f} / {env['load_end']:.1f}",
        f"- model: {env['model']}; profile: space `{meta.get('space')}`, ranks {meta.get('ranks')}, calibration "
        f"{cal.get('samples')} x {cal.get('seqlen')} tokens of `{cal.get('source')}`",
        f"- profile wall time (meta.json `seconds`, all runs of the profile together): {_f(meta.get('seconds'), '.0f')} s",
        *[f"- {line}" for line in args.notes],
        "- solve time per objective (sum over budgets): " + ", ".join(
            f"{k} {sum(v):.2f} s ({len(v)} budgets)" for k, v in solve.items()),
        f"- scoring: {setup['windows']} windows x {setup['seqlen']} tokens of `{args.data}` apart from the calibration "
        "text (the windows of `reports/objective_fidelity/`), not the 16 x 2048 of `reports/quality-v2/`: "
        "perplexities here are over short contexts and read higher",
        _mode_line(entries, setup), "",
        "![perplexity against bits per parameter](quality.png)", "",
        *budget_goals(entries, orig["perplexity"]),
    ]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.axhline(orig["perplexity"], color="k", ls=":", label=f"original ({orig['perplexity']:.2f})")
    for key in sorted({(e["objective"], e["source"]) for e in sweeps}):
        pts = sorted((e for e in sweeps if (e["objective"], e["source"]) == key), key=lambda e: e["bits_per_param"])
        ax.plot([e["bits_per_param"] for e in pts], [e["perplexity"] for e in pts], marker="o",
                label=f"{key[0]}{' refined' if key[1] == 'refined' else ''}")
    for e in entries:
        if e["source"] == "uniform" and e.get("perplexity") is not None:
            ax.scatter([e["bits_per_param"]], [e["perplexity"]], marker="s", s=50, zorder=3, label=e["label"])
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (targets, everything stored)")
    ax.set_ylabel(f"perplexity, {setup['windows']} x {setup['seqlen']} tokens (log)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(out / "quality.png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def _mode_line(entries: list[dict[str, Any]], setup: dict[str, Any]) -> str:
    """How the scored models were made, and the check of substitution against apply."""
    modes = {m: sum(e.get("mode") == m for e in entries) for m in ("substituted", "applied")}
    line = (f"- models: {modes['applied']} applied with `bitalloc.apply_allocation` (what `bitalloc apply` runs) and "
            f"loaded with `bitalloc.load`; {modes['substituted']} rank-0 allocations by in-memory substitution: each "
            "target's weight replaced by `Q` from the same `decompose` call `apply` makes (weight, config, the "
            "profile's Fisher estimate, seed)")
    v = setup.get("verify")
    if v:
        line += (f"; checked on `{v['label']}` against a real apply and load: largest weight difference "
                 f"{v['max_abs_difference']:.3g}, KL {v['kl_applied']:.6f} applied vs {v['kl_substituted']:.6f} "
                 "substituted")
    return line


def _figure(entries: list[dict[str, Any]], corr: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

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
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
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
    p.add_argument("--uniform", default="nf4-g64-s8x256-fp32-r0,nf3-g64-s8x256-fp32-r0",
                   help="uniform baselines scored on the same windows (no prediction)")
    p.add_argument("--no-substitute", action="store_true",
                   help="apply and load every allocation (default: rank-0 ones by in-memory substitution)")
    p.add_argument("--no-verify-apply", dest="verify_apply", action="store_false",
                   help="skip checking the substitution against one real apply and load")
    p.add_argument("--quality-out", default=None, help="also write the per-budget quality table here")
    p.add_argument("--note", dest="notes", action="append", default=[],
                   help="a line for both reports, e.g. how long calibration took (repeatable)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: no oversubscription on a loaded machine)")
    p.add_argument("--shard", default="1/1", help="i/n: measure every n-th allocation left (run n at once, then "
                   "once more without --shard for the report)")
    p.add_argument("--work", default=str(ROOT / ".bench-cache" / "objective_fidelity"))
    p.add_argument("--out", default=str(ROOT / "reports" / "objective_fidelity"))
    args = p.parse_args(argv)
    args.budgets = _floats(args.budgets)
    args.refine_budgets = _floats(args.refine_budgets)
    args.moves = [int(m) for m in _floats(args.moves)]
    args.range = tuple(_floats(args.range))
    args.uniform = [u for u in args.uniform.split(",") if u.strip()]
    try:
        args.shard = tuple(int(x) for x in args.shard.split("/"))
        assert len(args.shard) == 2 and 1 <= args.shard[0] <= args.shard[1]
    except (ValueError, AssertionError):
        p.error("--shard is i/n with 1 <= i <= n")
    torch.set_num_threads(args.threads)
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
    notes += [f"- {line}" for line in args.notes]
    _, meta = load_profile(profile_dir)
    setup = measure_all(args, entries, meta, work)
    if args.shard[1] > 1:
        log.info("shard %d/%d measured %d allocations; run without --shard for the report", *args.shard,
                 setup["measured"])
        return 0
    env = {
        "command": "python bench/objective_fidelity.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                   f"({torch.get_num_threads()} threads), cpu",
        "model": args.model or "smollm2-135m (built-in)",
        "load_start": load_start, "load_end": os.getloadavg()[0],
        "seconds": time.perf_counter() - started, "measured": setup["measured"],
    }
    corr = write_report(args, entries, notes, setup, meta, env, Path(args.out))
    if args.quality_out:
        write_quality(args, entries, setup, meta, env, Path(args.quality_out))
    for c in corr:
        if c["available"]:
            print(f"{c['objective']:>7}: Spearman {_f(c['overall'], '.3f')} overall ({c['n']}), "
                  f"{_f(c['low'], '.3f')} within {args.range[0]:g}-{args.range[1]:g} ({c['n_low']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
