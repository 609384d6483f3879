"""LoRAQuant on real adapters: two rank-16 LoRA adapters trained on the built-in model, quantized every way.

Adapters (trained here with PEFT on the CPU, cached outside the repository as PEFT directories
under ``<bitalloc cache>/bench-adapters/`` and reused; see ``bench/_adapters_train.py``):

- ``lm``: language modelling on the head of WikiText-2 validation; metric: perplexity on
  windows of the held-out tail (lower is better);
- ``add``: ``a+b=c`` written as text; metric: exact match of greedy decoding on a seeded
  held-out set of problems (higher is better).

Per adapter, one row per method: fp16 factors, RTN 2-bit and 1-bit (uniform configs on the SVD
factors), LoRAQuant's fixed rules 2@0.8, 2@0.9, 3@0.8, 3@0.9, and bitalloc's solver at the bits
each rule reaches (everything counted), with the plain objective and the activation-weighted one
(profile with ``--model`` and ``--calib``), plus the solver at 2.4 bits. Then one budget across
both adapters against one budget each. The bench drives the library calls behind ``bitalloc
adapter profile|solve|apply`` and scores each quantized adapter decoded by ``load_adapter`` and
merged into the base model.

Writes ``reports/adapters/results.md``, ``results.json`` and ``metric_vs_bits.png``.
Run: ``python bench/adapters.py`` (``--quick``: a few steps and problems, for a smoke check).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _adapters_train import (  # noqa: E402
    TrainSettings,
    addition_problems,
    ensure_adapter,
    exact_match,
    heldout_perplexity,
    heldout_problems,
    prompt_of,
    split_text_ids,
)
from bitalloc.adapters import (  # noqa: E402
    apply_adapters,
    load_adapter,
    profile_adapters,
    read_adapter,
    solve_adapters,
)
from bitalloc.atomic import atomic_write_bytes, atomic_write_json  # noqa: E402
from bitalloc.identity import BUILTIN_ALIAS, cache_root  # noqa: E402
from bitalloc.models import load_model, load_text  # noqa: E402

log = logging.getLogger("adapters")

VARIANTS = ("2@0.8", "2@0.9", "3@0.8", "3@0.9")
OBJECTIVES = ("plain", "act")
UNIFORM = {"RTN 2-bit": "lq2-h{r}-g128", "RTN 1-bit": "lq2-h0-g128"}
HIGHER_IS_BETTER = {"lm": False, "add": True}
METRIC_NAME = {"lm": "held-out perplexity", "add": "exact match"}


def _settings(args: argparse.Namespace) -> dict[str, TrainSettings]:
    if args.quick:
        return {"lm": TrainSettings(task="lm", rank=4, alpha=8.0, steps=3, batch=2, seqlen=16, lr=1e-2, warmup=1),
                "add": TrainSettings(task="add", rank=4, alpha=8.0, steps=3, batch=4, digits=2, lr=1e-2, warmup=1)}
    return {"lm": TrainSettings(task="lm", steps=args.lm_steps, batch=args.lm_batch, seqlen=args.lm_seqlen, lr=args.lr),
            "add": TrainSettings(task="add", steps=args.add_steps, batch=args.add_batch, digits=args.digits, lr=args.lr)}


class Scorer:
    """The base model with a swappable ``ΔW`` merged into its adapted layers, and each adapter's metric."""

    def __init__(self, model_spec: str | None, text: str, settings: dict[str, TrainSettings], windows: int,
                 problems: int, seed: int) -> None:
        self.model, self.tokenizer = load_model(model_spec)
        self.base: dict[str, torch.Tensor] = {}
        lm = settings["lm"]
        _, tail = split_text_ids(self.tokenizer, text, lm.heldout)
        seqlen = min(128, tail.numel() // max(1, windows))
        count = min(windows, tail.numel() // seqlen)
        self.windows = tail[: count * seqlen].reshape(count, seqlen)
        self.digits = settings["add"].digits
        self.problems = heldout_problems(problems, self.digits, seed)

    def _set(self, deltas: dict[str, torch.Tensor]) -> None:
        for name, weight in self.base.items():  # restore every layer touched before
            self.model.get_submodule(name).weight.data.copy_(weight)
        for name, delta in deltas.items():
            layer = self.model.get_submodule(name)
            if name not in self.base:
                self.base[name] = layer.weight.data.clone()
            layer.weight.data.add_(delta.to(layer.weight.dtype))

    def score(self, task: str, deltas: dict[str, torch.Tensor]) -> float:
        """The task's metric with ``deltas`` (module name -> ΔW) added to the base weights."""
        self._set(deltas)
        if task == "lm":
            return heldout_perplexity(self.model, self.windows)
        return exact_match(self.model, self.tokenizer, self.problems, self.digits)


def fp16_deltas(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """``ΔW = s·B·A`` with B and A rounded to fp16, and the adapter's parameter count."""
    adapter = read_adapter(path)
    deltas = {m.name: m.scale * (m.lora_b.half().float() @ m.lora_a.half().float()) for m in adapter.modules}
    return deltas, sum(m.rank * (m.rows + m.cols) for m in adapter.modules)


class Runner:
    """Solves, applies, decodes and scores allocations; remembers scores by allocation digest."""

    def __init__(self, scorer: Scorer, work: Path) -> None:
        self.scorer = scorer
        self.memo = work / "scores"  # one small file per score, so that runs for different adapters can share it
        self.memo.mkdir(parents=True, exist_ok=True)
        self.work = work

    def remembered(self, key: str, score: Callable[[], float]) -> float:
        """A score kept under ``key`` in the score files (computed once)."""
        memo = self.memo / f"{key}.json"
        if not memo.is_file():
            atomic_write_json(memo, {"metric": score()})
        return float(json.loads(memo.read_text())["metric"])

    def measure(self, alloc: Any, tasks: dict[str, str]) -> dict[str, dict[str, Any]]:
        """Apply ``alloc`` and score each adapter in it; ``tasks`` maps adapter name -> task."""
        digest = hashlib.sha256(json.dumps(alloc.assignments, sort_keys=True).encode()).hexdigest()[:16]
        out = self.work / "applied" / digest
        if not (out / "adapters.json").is_file():
            apply_adapters(alloc, out, force=True)
        index = {a["name"]: a for a in json.loads((out / "adapters.json").read_text())["adapters"]}
        rows = {}
        for name, task in tasks.items():
            memo = self.memo / f"{digest}-{name}.json"
            if not memo.is_file():
                dequant = load_adapter(out, name)
                atomic_write_json(memo, {"metric": self.scorer.score(task, {m: dequant.delta(m) for m in dequant.factors})})
            a = index[name]
            rows[name] = {"metric": json.loads(memo.read_text())["metric"], "bits_per_param": a["bits_per_param"],
                          "bits_per_param_codes": a["bits_per_param_codes"], "bytes": a["bytes"], "params": a["params"]}
        return rows


def _uniform_profile(path: Path, config: str, out: Path) -> Path:
    space_file = out.with_suffix(".json")
    space_file.write_text(json.dumps([config]))
    if not (out / "meta.json").is_file():
        profile_adapters([path], out, space=str(space_file), force=True)
    return out


def run_adapter(name: str, task: str, path: Path, calib: Path, runner: Runner, args: argparse.Namespace,
                rank: int) -> list[dict[str, Any]]:
    """Every method's row for one adapter."""
    work = runner.work / name
    work.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    tasks = {name: task}

    def add(method: str, family: str, alloc: Any | None, **extra: Any) -> dict[str, Any]:
        t = time.perf_counter()
        row = runner.measure(alloc, tasks)[name]
        row |= {"method": method, "family": family, "seconds": time.perf_counter() - t} | extra
        if alloc is not None:
            row |= {"objective": alloc.data.get("objective"), "status": alloc.data.get("status")}
        rows.append(row)
        log.info("%s %-24s metric %.4f at %.4f bits (%.4f codes)", name, method, row["metric"], row["bits_per_param"],
                 row["bits_per_param_codes"])
        return row

    base = runner.remembered(f"base-{name}", lambda: runner.scorer.score(task, {}))
    rows.append({"method": "base model (no adapter)", "family": "base", "metric": base, "bits_per_param": 0.0,
                 "bits_per_param_codes": 0.0, "bytes": 0, "params": 0})
    deltas, params = fp16_deltas(path)
    rows.append({"method": "fp16", "family": "fp16", "metric": runner.remembered(f"fp16-{name}", lambda: runner.scorer.score(task, deltas)),
                 "bits_per_param": 16.0, "bits_per_param_codes": 16.0, "bytes": 2 * params, "params": params})
    log.info("%s base %.4f, fp16 %.4f", name, base, rows[-1]["metric"])
    for method, config in UNIFORM.items():
        prof = _uniform_profile(path, config.format(r=rank), work / f"profile-{method.split()[1]}")
        add(method, "rtn", solve_adapters(prof, 64.0), config=config.format(r=rank))
    t = time.perf_counter()
    profile = work / "profile"
    if not (profile / "meta.json").is_file():
        profile_adapters([path], profile, model=args.model or BUILTIN_ALIAS, calib=str(calib), samples=args.calib_samples,
                         seqlen=args.calib_seqlen, force=True)
    profile_seconds = time.perf_counter() - t
    budgets = []
    for text in VARIANTS:
        fixed = solve_adapters(profile, variant=text)
        row = add(f"LoRAQuant {text}", "variant", fixed, variant=text)
        budgets.append((row["bits_per_param"], text))
    budgets.append((args.goal_bits, None))
    for budget, text in budgets:
        for objective in OBJECTIVES:
            alloc = solve_adapters(profile, budget * (1 + 1e-12), objective=objective)
            label = f"bitalloc {objective} @ {text}" if text else f"bitalloc {objective} @ {budget:g}"
            add(label, f"solver-{objective}", alloc, budget=budget, at_variant=text, solve_seconds=alloc.data["seconds"])
    rows[0]["profile_seconds"] = profile_seconds
    return rows


def run_fleet(paths: dict[str, Path], tasks: dict[str, str], runner: Runner, budgets: list[float]) -> list[dict[str, Any]]:
    """One budget across both adapters against the same budget for each (plain objective)."""
    profile = runner.work / "fleet-profile"
    if not (profile / "meta.json").is_file():
        profile_adapters(list(paths.values()), profile, force=True)
    out = []
    for budget in budgets:
        for mode in ("fleet", "per-adapter"):
            alloc = solve_adapters(profile, budget * (1 + 1e-12), per_adapter=mode == "per-adapter")
            rows = runner.measure(alloc, tasks)
            out.append({"budget": budget, "mode": mode, "bits_per_param": alloc.data["bits_per_param"],
                        "objective": alloc.data["objective"], "adapters": rows})
            log.info("%s budget %.3f: %s", mode, budget, {n: round(r["metric"], 4) for n, r in rows.items()})
    return out


# ----- report ------------------------------------------------------------------------------
def _better(task: str, a: float, b: float) -> bool:
    """a at least as good as b."""
    return a >= b - 1e-12 if HIGHER_IS_BETTER[task] else a <= b + 1e-12


def goals(res: dict[str, Any]) -> dict[str, Any]:
    """The two goals, per adapter and objective."""
    out: dict[str, Any] = {"solver_vs_rule": {}, "fp16_at_goal_bits": {}}
    for name, info in res["adapters"].items():
        task, rows = info["task"], info["rows"]
        by = {r["method"]: r for r in rows}
        fp16 = by["fp16"]["metric"]
        for objective in OBJECTIVES:
            checks = []
            for text in VARIANTS:
                rule, solver = by[f"LoRAQuant {text}"], by[f"bitalloc {objective} @ {text}"]
                checks.append({"variant": text, "rule": rule["metric"], "solver": solver["metric"],
                           "error_ratio": solver["objective"] / rule["objective"] if objective == "plain" else None,
                               "rule_bits": rule["bits_per_param"], "solver_bits": solver["bits_per_param"],
                               "met": _better(task, solver["metric"], rule["metric"])})
            out["solver_vs_rule"][f"{name}/{objective}"] = {"met": all(c["met"] for c in checks), "checks": checks}
            at = by[f"bitalloc {objective} @ {res['goal_bits']:g}"]
            if HIGHER_IS_BETTER[task]:
                kept = at["metric"] / fp16 if fp16 > 0 else float("nan")
            else:
                kept = fp16 / at["metric"]
            out["fp16_at_goal_bits"][f"{name}/{objective}"] = {"metric": at["metric"], "fp16": fp16, "kept": kept,
                                                              "bits_per_param": at["bits_per_param"], "met": kept >= 0.95}
    return out


def figure(res: dict[str, Any], path: Path) -> Path:
    """Task metric against bits/param (everything counted), one panel per adapter."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(res["adapters"])
    fig, axes = plt.subplots(1, len(names), figsize=(5.5 * len(names), 4.2), squeeze=False)
    style = {"rtn": ("s", "tab:gray", "RTN (uniform)"), "variant": ("o", "tab:red", "LoRAQuant b@ρ"),
             "solver-plain": ("^", "tab:blue", "bitalloc, plain error"),
             "solver-act": ("v", "tab:green", "bitalloc, activation-weighted")}
    for ax, name in zip(axes[0], names):
        info = res["adapters"][name]
        rows = info["rows"]
        by = {r["method"]: r for r in rows}
        for family, (marker, color, label) in style.items():
            pts = sorted((r["bits_per_param"], r["metric"]) for r in rows if r["family"] == family)
            if pts:
                ax.plot(*zip(*pts), marker=marker, color=color, label=label, linestyle="-" if family.startswith("solver") else "none")
        for ref, ls in (("fp16", "--"), ("base model (no adapter)", ":")):
            ax.axhline(by[ref]["metric"], color="black", linestyle=ls, linewidth=1, label=f"{ref} ({by[ref]['metric']:.3g})")
        ax.axvline(res["goal_bits"], color="tab:purple", linewidth=0.8, alpha=0.5)
        ax.set_xlabel("bits per LoRA parameter (everything stored counted)")
        ax.set_ylabel(METRIC_NAME[info["task"]])
        ax.set_title(f"adapter '{name}'")
        if info["task"] == "lm":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(task: str, value: float) -> str:
    return f"{value:.1%}" if task == "add" else f"{value:.3f}"


def render(res: dict[str, Any]) -> str:
    """The markdown page."""
    g = res["goals"]
    lines = [
        "# LoRAQuant on real adapters (SmolLM2-135M)" if not res["quick"] else "# LoRAQuant on real adapters (quick run)",
        "",
        "Two rank-16 LoRA adapters trained on the built-in model (q, k, v, o, gate, up, down of every block), "
        "quantized by each method, decoded with `bitalloc.load_adapter` and merged into the base model to be scored: "
        "`lm` (language modelling on WikiText-2 validation, metric: perplexity on windows of the held-out tail, lower is "
        "better) and `add` (`a+b=c` as text, metric: exact match of greedy decoding on a seeded held-out set, higher is "
        "better). Bits per LoRA parameter count everything stored (codes, fp16 scales and zero points); the codes-only "
        "column is LoRAQuant's convention. RTN rows are uniform configs on the SVD factors (`lq2-h16-g128`: every "
        "component 2-bit; `lq2-h0-g128`: every component 1-bit sign·mean). Solver rows use the default space "
        "(b in {2, 3, 4, 8}, every h, groups {32, 64, 128}) at the bits each fixed rule reaches, and at "
        f"{res['goal_bits']:g}.",
        "",
    ]
    for name, info in res["adapters"].items():
        task = info["task"]
        t = info["training"]
        s = t["settings"]
        lines += [f"## Adapter `{name}` ({METRIC_NAME[task]})", ""]
        what = (f"{s['steps']} steps of batch {s['batch']} x {s['seqlen']} tokens" if task == "lm" else
                f"{s['steps']} steps of batch {s['batch']} problems with operands of 1 to {s['digits']} digits")
        lines += [f"Training: rank {s['rank']}, alpha {s['alpha']:g}, AdamW lr {s['lr']:g} (warmup {s['warmup']}, cosine), "
                  f"{what}, seed {s['seed']}: {t['seconds'] / 60:.1f} min on the CPU, loss {t['loss_first10']:.3f} -> "
                  f"{t['loss_last10']:.3f}, {t['trainable_params']:,} LoRA parameters. {info['eval']}", ""]
        lines += ["| method | metric | bits/param (all) | codes only | bytes |", "|---|---:|---:|---:|---:|"]
        for r in info["rows"]:
            lines.append(f"| {r['method']} | {_fmt(task, r['metric'])} | {r['bits_per_param']:.3f} | "
                         f"{r['bits_per_param_codes']:.3f} | {r['bytes']:,} |")
        lines.append("")
    lines += ["## One budget across both adapters", "",
              "Plain objective; the fleet budget lets the solver move bits between the adapters, per-adapter holds each to it.", "",
              "| budget | mode | bits/param (all) | total error | " + " | ".join(f"{n}: metric (bits)" for n in res["adapters"]) + " |",
              "|---:|---|---:|---:|" + "---:|" * len(res["adapters"])]
    for f in res["fleet"]:
        cells = [f"{_fmt(res['adapters'][n]['task'], r['metric'])} ({r['bits_per_param']:.3f})" for n, r in f["adapters"].items()]
        lines.append(f"| {f['budget']:g} | {f['mode']} | {f['bits_per_param']:.3f} | {f['objective']:.4g} | " + " | ".join(cells) + " |")
    lines += ["", "## Goals", ""]
    for key, v in g["solver_vs_rule"].items():
        worse = [c["variant"] for c in v["checks"] if not c["met"]]
        detail = "; ".join(f"{c['variant']}: rule {c['rule']:.4g}, solver {c['solver']:.4g}"
                           + (f" (its ‖ΔW−ΔŴ‖² {c['error_ratio']:.3f}x the rule's)" if c["error_ratio"] is not None else "")
                           for c in v["checks"])
        lines.append(f"- Solver matches or beats the fixed ρ rule at equal bits, `{key}`: "
                     f"**{'met' if v['met'] else 'missed'}**" + (f" (worse at {', '.join(worse)})" if worse else "") + f". {detail}.")
    for key, v in g["fp16_at_goal_bits"].items():
        lines.append(f"- At least 95% of the fp16 metric at {res['goal_bits']:g} bits, `{key}`: **{'met' if v['met'] else 'missed'}** "
                     f"({v['kept']:.1%} kept: {v['metric']:.4g} against fp16 {v['fp16']:.4g}, at {v['bits_per_param']:.3f} bits/param).")
    lines += ["", "For perplexity, the share kept is fp16 perplexity / quantized perplexity.", ""]
    if res.get("discussion"):
        lines += [res["discussion"], ""]
    lines += ["![task metric against bits](metric_vs_bits.png)", "", "## Command and machine", "", f"`{res['command']}`", ""]
    lines += [f"- {k}: {v}" for k, v in res["machine"].items()]
    lines.append(f"- wall time: {res['wall_s'] / 60:.1f} min (training included when the adapters were not cached)")
    return "\n".join(lines) + "\n"


# ----- main --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="base model spec (default: the built-in model)")
    parser.add_argument("--text", default="wikitext2", help="text of the lm adapter (a source load_text reads)")
    parser.add_argument("--quick", action="store_true", help="a few steps, problems and windows (smoke check)")
    parser.add_argument("--lm-steps", type=int, default=60)
    parser.add_argument("--lm-batch", type=int, default=4)
    parser.add_argument("--lm-seqlen", type=int, default=64)
    parser.add_argument("--add-steps", type=int, default=80)
    parser.add_argument("--add-batch", type=int, default=16)
    parser.add_argument("--digits", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--windows", type=int, default=8, help="held-out windows of 128 tokens (lm)")
    parser.add_argument("--problems", type=int, default=120, help="held-out problems (add)")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seqlen", type=int, default=128)
    parser.add_argument("--goal-bits", type=float, default=2.4)
    parser.add_argument("--fleet-budgets", type=lambda s: [float(x) for x in s.split(",")], default=[1.8, 2.4])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--only", choices=("lm", "add"), default=None,
                        help="measure one adapter's rows and stop (no report): two such runs side by side fill the "
                             "shared score files, and a full run then reuses them")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None, help="trained adapters and work files (default: <bitalloc cache>/bench-adapters)")
    parser.add_argument("--out", default=str(ROOT / "reports" / "adapters"))
    args = parser.parse_args(argv)
    if args.quick:
        args.windows, args.problems, args.calib_samples, args.calib_seqlen = 2, 10, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("bitalloc").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    cache = Path(args.cache) if args.cache else cache_root() / "bench-adapters"
    settings = _settings(args)
    text = load_text(args.text)
    eval_pairs = set(heldout_problems(args.problems, settings["add"].digits, args.seed))
    paths, training = {}, {}
    if args.only != "add":
        paths["lm"], training["lm"] = ensure_adapter(args.model, settings["lm"], cache, "lm", text=text)
    if args.only != "lm":
        paths["add"], training["add"] = ensure_adapter(args.model, settings["add"], cache, "add", heldout_pairs=eval_pairs)
    key = hashlib.sha256(json.dumps([args.model, args.text, settings["lm"].key(""), settings["add"].key("")] + [args.windows, args.problems, args.calib_samples,
                                     args.calib_seqlen, args.seed]).encode()).hexdigest()[:12]
    work = cache / f"work-{key}"
    work.mkdir(parents=True, exist_ok=True)
    scorer = Scorer(args.model, text, settings, args.windows, args.problems, args.seed)
    runner = Runner(scorer, work)
    calib = {"lm": work / "calib-lm.txt", "add": work / "calib-add.txt"}
    head, _ = split_text_ids(scorer.tokenizer, text, settings["lm"].heldout)
    a = settings["add"]
    calib_text = {"lm": scorer.tokenizer.decode(head.tolist()),
                  "add": "\n".join(prompt_of(x, y) + str(x + y) for x, y in
                                   addition_problems(2000, a.digits, a.seed * 7919 + 1, eval_pairs))}
    for name, path in calib.items():
        if not path.is_file():
            atomic_write_bytes(path, calib_text[name].encode())
    tasks = {"lm": "lm", "add": "add"}
    res: dict[str, Any] = {"quick": args.quick, "goal_bits": args.goal_bits, "adapters": {}}
    evals = {"lm": f"Metric on {scorer.windows.shape[0]} windows of {scorer.windows.shape[1]} tokens of the held-out tail "
                   f"({settings['lm'].heldout:.0%} of the text); calibration for the activation-weighted objective: "
                   f"{args.calib_samples} windows of {args.calib_seqlen} tokens of the training head.",
             "add": f"Metric on {args.problems} held-out problems (greedy, KV cache, at most {a.digits + 2} new tokens); "
                    f"calibration: {args.calib_samples} windows of {args.calib_seqlen} tokens of training problems."}
    for name, task in tasks.items():
        if args.only not in (None, name):
            continue
        rank = settings[name].rank
        rows = run_adapter(name, task, paths[name], calib[name], runner, args, rank)
        res["adapters"][name] = {"task": task, "training": training[name], "path": str(paths[name]), "rows": rows,
                                 "eval": evals[name]}
    if args.only:
        log.info("measured adapter %s in %.0f s (no report with --only)", args.only, time.perf_counter() - t0)
        return 0
    res["fleet"] = run_fleet(paths, tasks, runner, args.fleet_budgets)
    res["goals"] = goals(res)
    from importlib.metadata import version

    res["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "load average at the end": " ".join(f"{x:.1f}" for x in os.getloadavg()),
                      "note": "shared with other jobs while it ran", "python": platform.python_version(),
                      "torch": torch.__version__, "peft": version("peft"), "date": dt.date.today().isoformat()}
    res["date"] = res["machine"]["date"]
    res["command"] = ("python bench/adapters.py " + " ".join(sys.argv[1:] if argv is None else argv)).strip()
    res["wall_s"] = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    figure(res, out / "metric_vs_bits.png")
    notes = out / "discussion.md"
    if notes.is_file():
        res["discussion"] = notes.read_text().strip()
    atomic_write_json(out / "results.json", res)
    atomic_write_bytes(out / "results.md", render(res).encode())
    log.info("wrote %s in %.0f s", out, res["wall_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
