"""Fisher estimate benchmark on the built-in model (SmolLM2-135M, 210 Linear targets).

Two parts:

1. **Timing.** One forward/backward pass over 256 tokens with gradients for every parameter
   (what a plain ``loss.backward()`` does, as in LQ-LoRA) against target-only gradients
   (``estimate_fisher(mode="exact")``), and 4 x 256 tokens in one pass with ``persample``
   (exact) and ``batched`` (squared batch gradient). Variants are interleaved so that load
   from other processes hits them alike; wall and process CPU time are recorded.
   The exact and persample estimates of the same 4 sequences are compared (they must agree).
2. **Cheap vs full.** Calibration: ``full_factor * samples`` WikiText-2 windows of ``seqlen``
   tokens; the cheap (default) estimate uses every ``full_factor``-th window, the full one all
   of them. Estimates are sums over sequences, so the full estimate is the sum of the
   ``full_factor`` disjoint group estimates (group 0 = the cheap one), and group 0 vs group 1
   gives the sampling-noise floor at the cheap size. The ``batched`` mode (biased) on the cheap
   windows is compared too. Per target: mean Fisher, elementwise Spearman, relative L2 and
   cosine of the Fisher maps (each estimate divided by its sequence count); across targets:
   Spearman of the mean Fisher and of a Fisher-weighted 3-bit round-to-nearest error
   ``Σ F ⊙ (W - RTN3(W))²``, the quantity a Fisher-weighted profile feeds the solver.

Writes ``reports/fisher/results.md`` and ``results.json``.
Run: ``.venv/bin/python bench/fisher_estimates.py`` (about 10-15 minutes on 2 idle cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitalloc.models.fisher import _grad_state, default_fisher_settings, estimate_fisher  # noqa: E402
from bitalloc.models.loading import load_model  # noqa: E402
from bitalloc.models.targets import find_targets, target_weight  # noqa: E402
from bitalloc.models.text import calibration_tokens  # noqa: E402

logger = logging.getLogger("bench.fisher")


# --------------------------------------------------------------------------- metrics


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 (ties broken by position; Fisher values are continuous)."""
    order = torch.argsort(x)
    ranks = torch.empty_like(order, dtype=torch.float64)
    ranks[order] = torch.arange(x.numel(), dtype=torch.float64)
    return ranks


SPEARMAN_SAMPLE = 1 << 16


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation; on a fixed random sample of 65,536 elements for larger tensors."""
    a, b = a.flatten(), b.flatten()
    if a.numel() > SPEARMAN_SAMPLE:
        pick = torch.randperm(a.numel(), generator=torch.Generator().manual_seed(0))[:SPEARMAN_SAMPLE]
        a, b = a[pick], b[pick]
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra @ rb) / (ra.norm() * rb.norm()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float((a @ b) / (a.norm() * b.norm()))


def rel_l2(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref.double()).norm() / ref.double().norm())


def rtn3_error(w: torch.Tensor) -> torch.Tensor:
    """Squared error of symmetric 3-bit round-to-nearest with an absmax scale per block of 64."""
    rows, cols = w.shape
    blocks = w.float().reshape(rows, -1, 64)
    scale = blocks.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 3.0
    q = torch.clamp(torch.round(blocks / scale), -4, 3) * scale
    return (blocks - q).square().reshape(rows, cols)


def compare(est: dict[str, torch.Tensor], n_est: int, ref: dict[str, torch.Tensor], n_ref: int,
            sq_err: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Per-target and across-target agreement of ``est / n_est`` with ``ref / n_ref``."""
    per_target = []
    for name in ref:
        a, b = est[name] / n_est, ref[name] / n_ref
        per_target.append({
            "name": name,
            "mean": float(a.mean()),
            "mean_ref": float(b.mean()),
            "spearman": spearman(a, b),
            "rel_l2": rel_l2(a, b),
            "cosine": cosine(a, b),
            "weighted_err": float((a * sq_err[name]).sum()),
            "weighted_err_ref": float((b * sq_err[name]).sum()),
        })

    def col(key: str) -> torch.Tensor:
        return torch.tensor([row[key] for row in per_target], dtype=torch.float64)

    def summary(key: str) -> dict[str, float]:
        values = col(key)
        return {"min": float(values.min()), "median": float(values.median()), "mean": float(values.mean()),
                "max": float(values.max())}

    mean_ratio = col("mean") / col("mean_ref")
    err_ratio = col("weighted_err") / col("weighted_err_ref")
    return {
        "across_targets": {
            "spearman_mean_fisher": spearman(col("mean"), col("mean_ref")),
            "spearman_weighted_err": spearman(col("weighted_err"), col("weighted_err_ref")),
            "mean_fisher_ratio": {"min": float(mean_ratio.min()), "median": float(mean_ratio.median()),
                                  "max": float(mean_ratio.max())},
            "weighted_err_ratio": {"min": float(err_ratio.min()), "median": float(err_ratio.median()),
                                   "max": float(err_ratio.max())},
        },
        "per_target_summary": {key: summary(key) for key in ("spearman", "rel_l2", "cosine")},
        "per_target": per_target,
    }


# --------------------------------------------------------------------------- timing


class Clock:
    def __enter__(self) -> "Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def full_grad_pass(model: torch.nn.Module, ids: torch.Tensor) -> Clock:
    """One forward/backward with gradients for every parameter (then dropped)."""
    with _grad_state(model, {id(p) for p in model.parameters()}), Clock() as clock:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        for p in model.parameters():
            p.grad = None
    return clock


def timing(model, targets, tokens: torch.Tensor, batch: int, rounds: int = 2) -> dict[str, Any]:
    """Timings, ``rounds`` rounds over ``batch`` fresh sequences each: full-gradient passes one by
    one, then each Fisher mode in one call (as it is used); exact vs persample agreement."""
    full_grad_pass(model, tokens[:1])  # warm-up
    clocks: dict[str, list[Clock]] = {"full": [], "exact": [], "persample": [], "batched": []}
    agreement = 0.0
    for r in range(rounds):
        block = tokens[r * batch : (r + 1) * batch]
        clocks["full"] += [full_grad_pass(model, block[i : i + 1]) for i in range(batch)]
        logger.info("round %d full-gradient passes: %s s", r, [round(c.wall, 1) for c in clocks["full"][-batch:]])
        results: dict[str, dict[str, torch.Tensor]] = {}
        for mode in ("exact", "persample", "batched"):
            with Clock() as clock:
                results[mode] = estimate_fisher(model, block, targets, mode=mode, batch_size=batch, progress=False)
            clocks[mode].append(clock)
            logger.info("round %d %s over %d sequences: %.1f s", r, mode, batch, clock.wall)
        agreement = max(agreement, max(rel_l2(results["persample"][n], results["exact"][n]) for n in results["exact"]))

    def stats(clocks: list[Clock], per: int) -> dict[str, float]:
        walls = [c.wall / per for c in clocks]
        cpus = [c.cpu / per for c in clocks]
        return {"wall_min": min(walls), "wall_median": statistics.median(walls), "cpu_min": min(cpus),
                "cpu_median": statistics.median(cpus), "reps": len(clocks)}

    return {
        "seqlen": int(tokens.shape[1]),
        "batch": batch,
        "per_sequence": {
            "full grads (all parameters), 1 seq per pass": stats(clocks["full"], 1),
            f"exact (target-only grads), 1 seq per pass; one call over {batch} seqs": stats(clocks["exact"], batch),
            f"persample, {batch} seqs in one pass": stats(clocks["persample"], batch),
            f"batched, {batch} seqs in one pass": stats(clocks["batched"], batch),
        },
        "persample_vs_exact_max_rel_l2": agreement,
        "load_during": _load(),
    }


# --------------------------------------------------------------------------- report


def render_markdown(res: dict[str, Any]) -> str:
    t = res["timing"]
    lines = [
        "# Fisher estimates on the built-in model",
        "",
        f"{res['model']} ({res['n_targets']} targets, {res['target_params']:,} target parameters), "
        f"calibration `{res['data']}`, {res['threads']} torch threads on {res['machine']}. "
        f"Generated by `bench/fisher_estimates.py` on {res['date']} in {res['elapsed_s'] / 60:.1f} min.",
        "",
        "The machine is shared with other jobs (load average "
        f"{res['load_before']} at the start, {res['load_after']} at the end), so the minima are the",
        "better guide, and ratios between interleaved variants matter more than absolute values.",
        "",
        f"## Time per sequence of {t['seqlen']} tokens (forward + backward)",
        "",
        f"Load average while timing: {t.get('load_during', 'n/a')}."
        + (f" Timed on {res['timing_rerun']['date']} by a separate `--only-timing` run." if "timing_rerun" in res else ""),
        "",
        "| variant | wall min (s) | wall median (s) | CPU min (s) | reps |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in t["per_sequence"].items():
        lines.append(f"| {name} | {s['wall_min']:.2f} | {s['wall_median']:.2f} | {s['cpu_min']:.2f} | {s['reps']} |")
    lines += [
        "",
        f"persample vs exact on the same {t['batch']} sequences: max relative L2 difference "
        f"{t['persample_vs_exact_max_rel_l2']:.1e} (float rounding; persample is exact).",
        "",
        f"Chosen CPU defaults: `{json.dumps(res['defaults_cpu'])}`; CUDA: `{json.dumps(res['defaults_cuda'])}`.",
        "",
        "## Cheap vs full estimate",
        "",
        f"cheap = {res['cheap']['samples']} x {res['seqlen']} tokens, persample (the CPU default); "
        f"full = {res['full']['samples']} x {res['seqlen']} (exact values, computed in persample mode); "
        f"noise = another disjoint {res['cheap']['samples']}-sequence estimate vs the cheap one; "
        f"batched = {res['cheap']['samples']} sequences, mode batched, batch {res['batched_batch']}. "
        "Each estimate is divided by its number of sequences before comparing.",
        f"Wall time: cheap {res['cheap']['wall_s']:.0f} s, full {res['full']['wall_s']:.0f} s"
        + (f", batched {res['batched']['wall_s']:.0f} s." if "batched" in res else "."),
        "",
        "| comparison | Spearman of mean F across targets | Spearman of F-weighted RTN3 error across targets "
        "| per-target Spearman (min / median) | per-target rel. L2 (median / max) | per-target cosine (min / median) "
        "| mean-F ratio (min / median / max) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, cmp in res["comparisons"].items():
        a, p = cmp["across_targets"], cmp["per_target_summary"]
        r = a["mean_fisher_ratio"]
        lines.append(
            f"| {label} | {a['spearman_mean_fisher']:.4f} | {a['spearman_weighted_err']:.4f} | "
            f"{p['spearman']['min']:.3f} / {p['spearman']['median']:.3f} | "
            f"{p['rel_l2']['median']:.3f} / {p['rel_l2']['max']:.3f} | "
            f"{p['cosine']['min']:.3f} / {p['cosine']['median']:.3f} | "
            f"{r['min']:.2f} / {r['median']:.2f} / {r['max']:.2f} |"
        )
    lines += [
        "",
        f"The cheap windows are a quarter of the full set, which flatters *cheap vs full*; *noise* (two disjoint "
        f"{res['cheap']['samples']}-sequence estimates) shows the sampling spread itself: a cheap estimate differs "
        "from the truth by about that spread divided by √2. *batched* overestimates the mean Fisher "
        "(median ratio above 1): the squared batch gradient adds (B-1)·E[g]² per sequence.",
    ]
    main = res["comparisons"]["cheap vs full"]["per_target"]
    lines += [
        "",
        "### Per target type (cheap vs full, medians over layers)",
        "",
        "| type | mean F cheap | mean F full | Spearman | rel. L2 | cosine |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    kinds: dict[str, list[dict[str, Any]]] = {}
    for row in main:
        kinds.setdefault(row["name"].split(".")[-1], []).append(row)
    for kind, rows in kinds.items():
        med = {k: statistics.median(r[k] for r in rows) for k in ("mean", "mean_ref", "spearman", "rel_l2", "cosine")}
        lines.append(f"| {kind} | {med['mean']:.3e} | {med['mean_ref']:.3e} | {med['spearman']:.3f} | "
                     f"{med['rel_l2']:.3f} | {med['cosine']:.3f} |")
    lines += ["", "Per-target values for every comparison are in `results.json`.", ""]
    return "\n".join(lines)


def _load() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = default_fisher_settings("cpu")
    parser.add_argument("--samples", type=int, default=defaults["samples"], help="cheap estimate's sequences")
    parser.add_argument("--seqlen", type=int, default=defaults["seqlen"])
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--full-factor", type=int, default=4, help="full estimate = this many times the samples")
    parser.add_argument("--data", default="wikitext2")
    parser.add_argument("--no-timing", action="store_true")
    parser.add_argument("--no-batched", action="store_true")
    parser.add_argument("--only-timing", action="store_true",
                        help="rerun only the timing part, updating an existing results.json and results.md")
    parser.add_argument("--rounds", type=int, default=2, help="timing rounds")
    parser.add_argument("--out", type=Path, default=ROOT / "reports" / "fisher")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started = time.perf_counter()
    load_before = _load()

    model, tokenizer = load_model(None)
    targets = find_targets(model)
    k, n = args.full_factor, args.samples
    tokens = calibration_tokens(args.data, model, tokenizer, args.seqlen, n * k)
    groups = [tokens[g::k] for g in range(k)]  # group 0: the cheap estimate's windows
    res: dict[str, Any] = {
        "model": "smollm2-135m (built-in)",
        "n_targets": len(targets),
        "target_params": sum(target_weight(m).numel() for _, m in targets),
        "data": args.data,
        "seqlen": args.seqlen,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.__version__}",
        "date": dt.date.today().isoformat(),
        "load_before": load_before,
        "defaults_cpu": default_fisher_settings("cpu"),
        "defaults_cuda": default_fisher_settings("cuda"),
        "batched_batch": args.batch_size,
    }
    if not args.no_timing:
        res["timing"] = timing(model, targets, groups[1], args.batch_size, args.rounds)
        logger.info("timing: %s", json.dumps(res["timing"]["per_sequence"]))
    if args.only_timing:
        previous = json.loads((args.out / "results.json").read_text())
        previous["timing"] = res["timing"]
        previous["timing_rerun"] = {"date": res["date"], "wall_s": time.perf_counter() - started}
        previous["defaults_cpu"], previous["defaults_cuda"] = res["defaults_cpu"], res["defaults_cuda"]
        (args.out / "results.json").write_text(json.dumps(previous, indent=2) + "\n")
        (args.out / "results.md").write_text(render_markdown(previous))
        logger.info("updated the timing in %s", args.out)
        return previous

    estimates, walls = [], []
    for g, group in enumerate(groups):
        with Clock() as clock:
            estimates.append(estimate_fisher(model, group, targets, mode="persample", batch_size=args.batch_size))
        walls.append(clock.wall)
        logger.info("group %d/%d: %.0f s", g + 1, k, clock.wall)
    cheap = estimates[0]
    full = {name: sum(e[name] for e in estimates) for name in cheap}
    res["cheap"] = {"samples": n, "wall_s": walls[0]}
    res["full"] = {"samples": n * k, "wall_s": sum(walls)}
    sq_err = {name: rtn3_error(target_weight(module).detach()) for name, module in targets}
    res["comparisons"] = {
        "cheap vs full": compare(cheap, n, full, n * k, sq_err),
        "noise: cheap vs disjoint cheap": compare(estimates[1], n, cheap, n, sq_err),
    }
    if not args.no_batched:
        with Clock() as clock:
            batched = estimate_fisher(model, groups[0], targets, mode="batched", batch_size=args.batch_size)
        res["batched"] = {"samples": n, "wall_s": clock.wall}
        res["comparisons"]["batched (cheap windows) vs full"] = compare(batched, n, full, n * k, sq_err)
        res["comparisons"]["batched vs persample, same windows"] = compare(batched, n, cheap, n, sq_err)

    res["elapsed_s"] = time.perf_counter() - started
    res["load_after"] = _load()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    if "timing" not in res:
        res["timing"] = {"seqlen": args.seqlen, "batch": args.batch_size, "per_sequence": {},
                         "persample_vs_exact_max_rel_l2": float("nan")}
    (args.out / "results.md").write_text(render_markdown(res))
    logger.info("wrote %s", args.out)
    return res


if __name__ == "__main__":
    main()
