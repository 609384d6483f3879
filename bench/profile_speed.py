"""Speed benchmark: bitalloc's decompose_many against the faithful LQ-LoRA loop.

For the 7 target matrices of each of ``--layers`` (default 0,1) of the built-in model
(SmolLM2-135M: q_proj 576x576, k_proj/v_proj 192x576, o_proj 576x576, gate/up 1536x576,
down 576x1536) and the full ``config_space("lqlora", ranks=(64,))`` (288 configs), on one
device, in one run:

* bitalloc: ``decompose_many(W, all 288 configs)`` per matrix (wall and CPU time, and the
  work: quantizations x matrix entries);
* the reference (``bench/_lqlora_reference.py``: every (matrix, config) alone, cold start,
  randomized SVD, stop at the first rise, keep the last iterate) on every ``--ref-every``-th
  config (a deterministic stride through the config list, so every bits/block/scale setting
  is represented); its time is extrapolated to all configs (labelled as such), and errors
  are compared only on the configs it ran. The reference is seeded, so
  ``--reference-from results.json`` reads its rows (errors and measured times) from an
  earlier run of the same configs instead of running it again;
* knob ablations (``bench/_profile_speed_ablations.py``: each a ``LoopPolicy`` with one knob
  at its neutral value) on ``--ablation-matrices``, interleaved with repeats of the default
  policy to measure the timing noise; each knob's verdict (needed or not) is computed;
* a quantizer micro-benchmark: ``quantize(W, c).dequantize()`` against the packing-free
  ``quantize_dequantize`` (bit-identical), and ``decompose_many`` on one matrix with
  bitalloc's malloc setting and, in a child process, with glibc's defaults.

``--full-model SPEC`` (repeatable; ``default``, ``lqlora``, or ``lqlora@5`` for every 5th
layer) times ``bitalloc profile --no-fisher --space S --ranks 64`` of the whole built-in
model in a child process (wall time, load average, configs/s; a layer subset is
extrapolated to all layers, labelled as such); with ``--skip-main`` only that runs, merged
into the existing results.

Writes ``reports/profile_speed/results.json`` and ``results.md`` (``_profile_speed_render.py``).
``--quick`` runs a small subset for development. Timings on a shared machine are noisy: CPU
time of this process is reported beside wall time, both methods run interleaved, matrix by
matrix, with the same torch thread count, and the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _lqlora_reference import lqlora_reference  # noqa: E402
from _profile_speed_ablations import ABLATIONS, BASELINE, NOT_EXERCISED, Ablation  # noqa: E402
from _profile_speed_render import parse_full_spec, render_md, summary  # noqa: E402

from bitalloc.configs import QuantConfig, config_space  # noqa: E402
from bitalloc.lowrank import LoopPolicy, decompose_many  # noqa: E402
from bitalloc.lowrank.state import keep_freed_memory  # noqa: E402
from bitalloc.quant import quantize, quantize_dequantize  # noqa: E402

log = logging.getLogger("bench.profile_speed")

SHAPES = {  # SmolLM2-135M, one layer
    "self_attn.q_proj": (576, 576),
    "self_attn.k_proj": (192, 576),
    "self_attn.v_proj": (192, 576),
    "self_attn.o_proj": (576, 576),
    "mlp.gate_proj": (1536, 576),
    "mlp.up_proj": (1536, 576),
    "mlp.down_proj": (576, 1536),
}
ABLATION_MATRICES = "self_attn.k_proj,self_attn.q_proj,self_attn.o_proj,mlp.down_proj"
#: A knob is needed when its removal costs at least this much CPU time or work (relative).
KNOB_THRESHOLD = 0.03


def load_matrices(layers: list[int], path: str | None = None) -> tuple[dict[str, torch.Tensor], str]:
    """The target matrices of ``layers`` of the built-in model (from ``path``, a safetensors
    file written by ``--save-matrices``, when given), or seeded N(0, 0.02^2) stand-ins."""
    if path:
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise SystemExit(f"--matrices {path}: no such file; write it with --save-matrices FILE")
        saved = load_file(path)
        wanted = [f"model.layers.{layer}.{name}" for layer in layers for name in SHAPES]
        missing = [n for n in wanted if n not in saved]
        if missing:
            raise SystemExit(f"--matrices {path}: missing {missing[:3]}...; write it with --save-matrices "
                             f"and the same --layers")
        return ({n: saved[n].float().contiguous() for n in wanted},
                f"built-in model SmolLM2-135M-Instruct (its matrices saved to {Path(path).name} by --save-matrices)")
    try:
        from bitalloc.models import find_targets, load_model
        from bitalloc.models.targets import target_weight

        model, _ = load_model(None)
        out = {}
        for name, module in find_targets(model):
            for layer in layers:
                prefix = f"model.layers.{layer}."
                if name.startswith(prefix) and name[len(prefix):] in SHAPES:
                    out[name] = target_weight(module).detach().float().contiguous().clone()
        if len(out) == 7 * len(layers):
            return out, "built-in model SmolLM2-135M-Instruct (bitalloc.models.load_model(None))"
        log.warning("found %d of %d target matrices; using random stand-ins", len(out), 7 * len(layers))
    except Exception as exc:  # the model package or its data may be missing
        log.warning("could not load the built-in model (%s); using random stand-ins", exc)
    g = torch.Generator().manual_seed(0)
    out = {
        f"model.layers.{layer}.{name}": 0.02 * torch.randn(*shape, generator=g)
        for layer in layers
        for name, shape in SHAPES.items()
    }
    return out, "seeded N(0, 0.02^2) stand-ins of the SmolLM2-135M shapes (the model could not be loaded)"


class Clock:
    """Wall and process-CPU seconds of a block (CUDA work included: it synchronizes)."""

    def __enter__(self) -> "Clock":
        _sync()
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        _sync()
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def run_reference(W: torch.Tensor, cfgs: list[QuantConfig], seed: int = 0) -> tuple[list[dict], float, float]:
    rows, wall, cpu = [], 0.0, 0.0
    for c in cfgs:
        with Clock() as t:
            r = lqlora_reference(W, c, seed=seed)
        wall, cpu = wall + t.wall, cpu + t.cpu
        rows.append({
            "config": c.name, "error": r.error, "error_unstored": r.error_unstored,
            "best_iterate_error": r.best_error, "iterations": r.iterations,
            "wall_s": t.wall, "cpu_s": t.cpu,
        })
    return rows, wall, cpu


class _QuantizationCount(logging.Handler):
    """Collects the quantization count that ``decompose_many`` logs for each matrix."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.counts: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "quantizations"):
            self.counts.append(int(record.quantizations))


_COUNT = _QuantizationCount()


def _count_quantizations() -> None:
    schedule_log = logging.getLogger("bitalloc.lowrank.schedule")
    schedule_log.setLevel(logging.DEBUG)
    schedule_log.propagate = False  # its per-matrix line only feeds the count
    if _COUNT not in schedule_log.handlers:
        schedule_log.addHandler(_COUNT)


def run_bitalloc(W: torch.Tensor, cfgs: list[QuantConfig], policy: LoopPolicy = BASELINE,
                 seed: int = 0) -> tuple[list[dict], float, float, int]:
    """``decompose_many`` rows, wall and CPU seconds, and its work (quantizations x entries)."""
    _count_quantizations()
    with Clock() as t:
        ds = decompose_many(W, cfgs, seed=seed, policy=policy)
    rows = [{"config": d.cfg.name, "error": d.error, "iterations": d.iterations,
             "evaluations": len(d.history)} for d in ds]
    return rows, t.wall, t.cpu, _COUNT.counts.pop() * W.numel()


def quantize_floor(W: torch.Tensor, cfgs: list[QuantConfig]) -> float:
    """CPU seconds of one ``quantize_dequantize(W, c)`` per config: a floor for any method
    that must produce each config's Q (every method here calls it at least once per config)."""
    with Clock() as t:
        for c in cfgs:
            quantize_dequantize(W, c, check=False)
    return t.cpu


def quant_micro(mats: dict[str, torch.Tensor], cfgs: list[QuantConfig], reps: int = 3) -> dict:
    """Milliseconds per call (best of ``reps`` passes over ``cfgs``) of the packing quantizer's
    round trip and of the packing-free ``quantize_dequantize``, per matrix shape."""
    out = {}
    for W in mats.values():
        shape = "x".join(map(str, W.shape))
        if shape in out:
            continue
        row = {}
        for label, fn in (("quantize_dequantize_ms", lambda c: quantize(W, c).dequantize()),
                          ("fast_path_ms", lambda c: quantize_dequantize(W, c))):
            best = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                for c in cfgs:
                    fn(c)
                best = min(best, (time.perf_counter() - t0) / len(cfgs) * 1e3)
            row[label] = best
        out[shape] = row
    return out


def malloc_ab(W: torch.Tensor, cfgs: list[QuantConfig], policy: LoopPolicy = BASELINE) -> float:
    """CPU seconds of ``decompose_many(W, cfgs)`` (run in-process and in a child that leaves
    glibc's malloc settings alone, to see what keeping freed memory buys on the real loop)."""
    with Clock() as t:
        decompose_many(W, cfgs, policy=policy)
    return t.cpu


def run_ablations(mats: dict[str, torch.Tensor], cfgs: list[QuantConfig], ref_cfgs: list[QuantConfig],
                  ref_rows: dict[str, list[dict]], ablations: list[Ablation], baselines: int) -> dict:
    """Every ablation on every matrix, interleaved with ``baselines`` runs of the default policy.

    Per matrix: the default, then the ablations in ``baselines - 1`` slices, each followed by
    the default again. Each variant's CPU time, work and errors are summed over the matrices
    and compared with the mean of the default's runs; the spread of those runs is the noise.
    """
    slices = max(1, baselines - 1)
    size = math.ceil(len(ablations) / slices)
    base_cpu = [0.0] * baselines
    base_work, base_ratios, base_evals = 0, [], 0
    acc = {a.name: {"cpu_s": 0.0, "work": 0, "ratios": [], "evaluations": 0, "configs": 0} for a in ablations}
    for name, W in mats.items():
        short = name.split(".", 3)[-1]
        for j in range(baselines):
            rows, _, cpu, work = run_bitalloc(W, cfgs)
            base_cpu[j] += cpu
            if j == 0:
                base_work += work
                base_ratios += ratios(rows, ref_rows[name])
                base_evals += sum(r["evaluations"] for r in rows)
                base_errors = [r["error"] for r in rows]
            elif [r["error"] for r in rows] != base_errors:
                raise SystemExit(f"{short}: the default policy gave other errors on a repeat (not deterministic)")
            log.info("  %s default #%d: %.2fs cpu", short, j, cpu)
            for a in ablations[j * size:(j + 1) * size] if j < slices else []:
                run_cfgs = ref_cfgs if a.alone else cfgs
                rows, _, cpu, work = run_bitalloc(W, run_cfgs, a.policy)
                s = acc[a.name]
                s["cpu_s"] += cpu
                s["work"] += work
                s["ratios"] += ratios(rows, ref_rows[name])
                s["evaluations"] += sum(r["evaluations"] for r in rows)
                s["configs"] += len(run_cfgs)
                log.info("  %s %-28s %.2fs cpu %s", short, a.name, cpu, summary(ratios(rows, ref_rows[name])))
    mean = statistics.mean(base_cpu)
    noise = (max(base_cpu) - min(base_cpu)) / mean
    n_cfgs = len(cfgs) * len(mats)
    baseline = {"cpu_s_runs": base_cpu, "cpu_s": mean, "noise": noise, "work": base_work,
                "quantize_calls_per_config": base_evals / n_cfgs,
                "error_ratio_vs_reference": summary(base_ratios)}
    rows_out = []
    for a in ablations:
        s = acc[a.name]
        scale = n_cfgs / s["configs"]  # per-config cost, for the ablations on the reference subset
        cpu_change = s["cpu_s"] * scale / mean - 1
        work_change = s["work"] * scale / base_work - 1
        errors = summary(s["ratios"])
        worse = errors["worse_than_1pct"] - baseline["error_ratio_vs_reference"]["worse_than_1pct"]
        rows_out.append({
            "variant": a.name, "knob": a.knob, "what": a.what, "alone": a.alone,
            "changes": _changes(a.policy), "cpu_s": s["cpu_s"], "configs": s["configs"],
            "cpu_change": cpu_change, "work_change": work_change,
            "quantize_calls_per_config": s["evaluations"] / s["configs"],
            "error_ratio_vs_reference": errors, "worse_entries_change": worse,
            "verdict": verdict(cpu_change, work_change, worse, noise),
        })
    return {"matrices": list(mats), "configs": len(cfgs), "reference_configs": len(ref_cfgs),
            "baseline_policy": BASELINE.to_dict(), "baseline": baseline, "rows": rows_out,
            "threshold": KNOB_THRESHOLD, "not_exercised": NOT_EXERCISED}


def _revise_verdicts(ablations: dict) -> None:
    """Each ablation row's verdict by this code's rule, and whether LoopPolicy still has the knob."""
    for row in ablations.get("rows", []):
        row["verdict"] = verdict(row["cpu_change"], row["work_change"], row["worse_entries_change"],
                                 ablations["baseline"]["noise"])
        row["kept"] = row["knob"] in LoopPolicy.__dataclass_fields__


def _changes(policy: LoopPolicy) -> dict:
    """The fields in which ``policy`` differs from the default, JSON-ready."""
    base, mine = BASELINE.to_dict(), policy.to_dict()
    return {k: mine[k] for k in mine if mine[k] != base[k]}


def verdict(cpu_change: float, work_change: float, worse: int, noise: float) -> str:
    """Whether a knob earns its place, from what its removal did.

    Needed when removing it adds entries more than 1% above the reference, or costs at least
    :data:`KNOB_THRESHOLD` more CPU time, beyond the default's own spread; where the CPU time
    cannot tell (its change within the noise), the deterministic work decides. Otherwise the
    knob goes. An increase of the CPU time within the noise, with the work within the threshold,
    cannot tell: "unclear", kept.
    """
    if worse > 0:
        return "needed (more entries >1% worse without it)"
    if cpu_change >= KNOB_THRESHOLD and cpu_change > noise:
        return "needed (slower without it)"
    if work_change >= KNOB_THRESHOLD:
        return "needed (more work without it)"
    if work_change <= -KNOB_THRESHOLD:
        return "not needed (less work without it)"
    if cpu_change >= KNOB_THRESHOLD:
        return "unclear (slower without it, within the noise)"
    return "not needed"


def reference_noise(per_matrix: dict, seeds: list[int]) -> dict:
    """The reference against itself (other seeds / seed 0) and bitalloc against the median of
    the reference's seeds, by code width, on the matrices rerun with ``seeds``."""
    other, vs_median, vs_seed0 = {}, {}, {}
    matrices = [n for n, pm in per_matrix.items() if "reference_other_seeds" in pm]
    for name in matrices:
        pm = per_matrix[name]
        ours = {o["config"]: o["error"] for o in pm["bitalloc"]}
        for i, row in enumerate(pm["reference"]):
            bits = row["config"].split("-")[0].upper()
            runs = [row["error"]] + [pm["reference_other_seeds"][str(s)][i] for s in seeds]
            for run in runs[1:]:
                other.setdefault(bits, []).append(run / row["error"])
            vs_median.setdefault(bits, []).append(ours[row["config"]] / statistics.median(runs))
            vs_seed0.setdefault(bits, []).append(ours[row["config"]] / row["error"])
    if not matrices:
        return {}

    def table(d: dict) -> dict:
        return {"all": summary([x for v in d.values() for x in v]), **{k: summary(v) for k, v in sorted(d.items())}}

    return {
        "seeds": [0, *seeds], "matrices": matrices,
        "reference_other_seed_over_seed0": table(other),
        "bitalloc_over_reference_median": table(vs_median),
        "bitalloc_over_reference_seed0": table(vs_seed0),
    }


def bitalloc_noise(mats: dict[str, torch.Tensor], per_matrix: dict, cfgs: list[QuantConfig],
                   seeds: list[int], verify: bool = False) -> dict:
    """bitalloc rerun with other seeds (``decompose_many(..., seed=s)``): its entries more than 1%
    worse than the reference per seed, and its errors against its own seed-0 run by code width.
    ``verify``: first check that this code reproduces the seed-0 errors of ``per_matrix``."""
    if not seeds:
        return {}
    first = next(iter(per_matrix))
    stored = [row["error"] for row in per_matrix[first]["bitalloc"]]
    if verify and [row["error"] for row in run_bitalloc(mats[first], cfgs)[0]] != stored:
        raise SystemExit("the seed-0 errors of this code differ from those in results.json: rerun the "
                         "whole benchmark instead of --bitalloc-noise-only")
    out: dict[str, Any] = {"seeds": seeds, "matrices": len(per_matrix), "per_seed": {}}
    for seed in seeds:
        vs_ref, vs_self, cpu = [], {}, 0.0
        for name, pm in per_matrix.items():
            rows, _, c, _ = run_bitalloc(mats[name], cfgs, seed=seed)
            cpu += c
            vs_ref += ratios(rows, pm["reference"])
            seed0 = {o["config"]: o["error"] for o in pm["bitalloc"]}
            for row in rows:
                if seed0[row["config"]] > 0:
                    bits = row["config"].split("-")[0].upper()
                    vs_self.setdefault(bits, []).append(row["error"] / seed0[row["config"]])
        out["per_seed"][str(seed)] = {
            "cpu_s": cpu, "vs_reference": summary(vs_ref),
            "vs_seed0": {bits: {**summary(v), "better_than_1pct": sum(x < 1 / 1.01 for x in v),
                                "median_abs_log": statistics.median(abs(math.log(x)) for x in v)}
                         for bits, v in sorted(vs_self.items())},
        }
        log.info("bitalloc seed %d: %s vs the reference", seed, summary(vs_ref))
    return out


def ratios(ours: list[dict], ref: list[dict], key: str = "error") -> list[float]:
    """bitalloc's error / the reference's (``key``) on each config the reference ran."""
    by = {r["config"]: r for r in ours}
    return [by[r["config"]]["error"] / r[key] for r in ref if r[key] > 0]


def _seeds(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]`` (argparse type; ``''`` = none)."""
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give comma-separated integers, e.g. 1,2 ('' for none)")


def _device_arg(text: str) -> torch.device:
    """``--device``: cpu or cuda[:i] (argparse type)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: use cpu, cuda or cuda:i")
    return device


def _command() -> str:
    """This run's command line, as the results record it."""
    return " ".join([Path(sys.executable).name, "bench/profile_speed.py", *sys.argv[1:]])


def _read_results(out: Path, option: str) -> dict:
    """The results.json that ``option`` adds to (a clear error when there is none)."""
    path = out / "results.json"
    if not path.is_file():
        raise SystemExit(f"{option}: no {path} to add to; run the whole benchmark first (or point --out at its results)")
    return json.loads(path.read_text())


def _write_results(out: Path, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render_md(result))
    log.info("wrote %s", out)


def _reference_rows(path: str, mats: dict[str, torch.Tensor], ref_cfgs: list[QuantConfig]) -> dict:
    """The reference's rows per matrix from an earlier results.json of the same configs."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--reference-from {path}: no such file")
    saved = json.loads(p.read_text())
    want = [c.name for c in ref_cfgs]
    out = {}
    for name in mats:
        pm = saved.get("per_matrix", {}).get(name)
        if pm is None or [row["config"] for row in pm["reference"]] != want:
            raise SystemExit(f"--reference-from {path}: no reference rows for {name} with these configs "
                             f"(same --layers and --ref-every?)")
        out[name] = {k: pm[k] for k in ("reference", "reference_measured_cpu_s", "reference_measured_wall_s",
                                         "reference_other_seeds") if k in pm}
    return {"rows": out, "command": saved.get("command"), "date": saved.get("date"),
            "load_average": saved.get("machine", {}).get("load_average_start")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configs and two matrices (development)")
    ap.add_argument("--layers", default="0,1", help="comma-separated layer indices (default 0,1: 14 matrices)")
    ap.add_argument("--ref-every", type=int, default=7,
                    help="run the reference on every N-th config (default 7: coprime to the 2 scale "
                         "dtypes and 3 scale groups, so every setting is represented)")
    ap.add_argument("--reference-from", metavar="RESULTS_JSON",
                    help="read the reference's rows (seeded: its errors do not change) from an earlier "
                         "results.json of the same --layers and --ref-every instead of running it")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see results.md)")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--ablations-from", metavar="RESULTS_JSON",
                    help="no ablations here: take them (with their command) from another results.json")
    ap.add_argument("--ablation-matrices", default=ABLATION_MATRICES,
                    help=f"the first layer's matrices the ablations run on (default {ABLATION_MATRICES})")
    ap.add_argument("--ablation-baselines", type=int, default=3,
                    help="runs of the default policy per ablation matrix, interleaved with the ablations (default 3)")
    ap.add_argument("--noise-seeds", type=_seeds, default="1,2",
                    help="rerun the reference with these seeds on the first layer's matrices (its "
                         "run-to-run spread; '' to skip)")
    ap.add_argument("--bitalloc-seeds", type=_seeds, default="1,2",
                    help="rerun bitalloc with these seeds on every matrix (its own run-to-run spread; '' to skip)")
    ap.add_argument("--bitalloc-noise-only", action="store_true",
                    help="only the --bitalloc-seeds reruns, merged into the existing results.json (whose "
                         "seed-0 errors this code must reproduce)")
    ap.add_argument("--full-model", action="append", default=[], metavar="SPEC",
                    help="also time a whole-model `bitalloc profile`: SPACE[@N][:ranks=R][:jobs=J], e.g. "
                         "default:ranks=auto or lqlora@10 (every N-th layer, extrapolated; ranks default 64, "
                         "jobs default: the CLI's); repeatable")
    ap.add_argument("--skip-main", action="store_true",
                    help="only the --full-model runs, merged into the existing results.json")
    ap.add_argument("--quant-micro-json", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--render-only", action="store_true", help="rewrite results.md from results.json")
    ap.add_argument("--device", type=_device_arg, default="cpu",
                    help="cpu (default) or cuda[:i]: both methods run there; on CUDA the speedup is "
                         "by wall time, and the quantizer micro-benchmark is skipped (write the "
                         "results elsewhere with --out)")
    ap.add_argument("--matrices", metavar="FILE",
                    help="read the matrices from FILE (written by --save-matrices) instead of the model")
    ap.add_argument("--save-matrices", metavar="FILE",
                    help="write the --layers matrices of the built-in model to FILE (safetensors) and exit")
    ap.add_argument("--time-limit", type=float, default=None, metavar="S",
                    help="start no new matrix after S seconds; the report covers the matrices done")
    ap.add_argument("--out", default=str(ROOT / "reports" / "profile_speed"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.quant_micro_json:  # child process of the micro-benchmark: glibc's malloc defaults
        mats, _ = load_matrices([0])
        space = config_space("lqlora", ranks=(64,))
        q = next(v for k, v in mats.items() if k.endswith("self_attn.q_proj"))
        untuned = BASELINE.replace(keep_freed_memory=False)
        print(json.dumps({"quant": quant_micro(mats, space[::23]),
                          "decompose_many_q_proj_cpu_s": malloc_ab(q, space, untuned)}))
        return 0
    keep_freed_memory()  # what decompose_many does anyway; now, so the reference runs with it too
    out = Path(args.out)
    if args.render_only:
        result = _read_results(out, "--render-only")
        _revise_verdicts(result.get("ablations") or {})
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "results.md").write_text(render_md(result))
        return 0
    if args.skip_main:
        result = _read_results(out, "--skip-main")
        # replaced, not merged: timings from other code or another default space would mislead
        result["full_model"] = run_full_models(args.full_model, args.threads)
        result["full_model_command"] = _command()
        _write_results(out, result)
        return 0
    load_start = os.getloadavg()

    layers = [int(x) for x in args.layers.split(",")]
    if args.bitalloc_noise_only:
        result = _read_results(out, "--bitalloc-noise-only")
        mats, _ = load_matrices(layers, args.matrices)
        missing = set(result["per_matrix"]) - set(mats)
        if missing:
            raise SystemExit(f"results.json has matrices outside --layers: {sorted(missing)[:3]}...")
        cfgs = [QuantConfig.from_name(row["config"]) for row in next(iter(result["per_matrix"].values()))["bitalloc"]]
        result["bitalloc_noise"] = bitalloc_noise(mats, result["per_matrix"], cfgs, args.bitalloc_seeds, verify=True)
        result["bitalloc_noise_command"] = _command()
        _write_results(out, result)
        return 0
    if args.save_matrices:
        from safetensors.torch import save_file

        mats, source = load_matrices(layers)
        if not source.startswith("built-in"):
            raise SystemExit("--save-matrices: the built-in model could not be loaded (see the warning)")
        save_file(mats, args.save_matrices)
        log.info("wrote %d matrices to %s", len(mats), args.save_matrices)
        return 0
    device = args.device
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {device}: no CUDA device here; use --device cpu")
    on_cpu = device.type == "cpu"
    mats, source = load_matrices(layers, args.matrices)
    mats = {k: v.to(device) for k, v in mats.items()}
    cfgs = config_space("lqlora", ranks=(64,))
    first_layer = f"model.layers.{layers[0]}."
    ablation_names = [first_layer + n for n in args.ablation_matrices.split(",") if n]
    if args.quick:
        cfgs = cfgs[::12]
        mats = {k: v for k, v in mats.items() if k in ablation_names[:2]}
    ref_idx = list(range(0, len(cfgs), args.ref_every))
    ref_cfgs = [cfgs[i] for i in ref_idx]
    cached = _reference_rows(args.reference_from, mats, ref_cfgs) if args.reference_from else None
    if not on_cpu:  # kernels, cuBLAS/cuSOLVER handles: not in the first matrix's time
        w = next(iter(mats.values()))
        decompose_many(w, cfgs[:2])
        lqlora_reference(w, cfgs[0], max_iters=2)
    started = time.perf_counter()
    log.info("%d matrices, %d configs, reference on %d", len(mats), len(cfgs), len(ref_cfgs))

    noise_seeds = args.noise_seeds
    per_matrix, all_ratios, all_unstored, all_best = {}, [], [], []
    tot = {"ours_wall": 0.0, "ours_cpu": 0.0, "ref_wall": 0.0, "ref_cpu": 0.0, "floor_cpu": 0.0, "work": 0}
    for name, W in mats.items():
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            log.warning("--time-limit %.0f s reached: %d of %d matrices done", args.time_limit,
                        len(per_matrix), len(mats))
            break
        short = name.split(".", 3)[-1]
        if cached:
            ref = cached["rows"][name]
            ref_rows, ref_wall, ref_cpu = ref["reference"], ref["reference_measured_wall_s"], ref["reference_measured_cpu_s"]
        else:
            ref_rows, ref_wall, ref_cpu = run_reference(W, ref_cfgs)
        ours, wall, cpu, work = run_bitalloc(W, cfgs)
        floor = quantize_floor(W, cfgs)
        tot["floor_cpu"] += floor
        scale = len(cfgs) / len(ref_cfgs)
        rs = ratios(ours, ref_rows)
        all_ratios += rs
        all_unstored += ratios(ours, ref_rows, "error_unstored")
        all_best += [r["best_iterate_error"] / r["error"] for r in ref_rows if r["error"] > 0]
        per_matrix[name] = {
            "shape": list(W.shape),
            "bitalloc_wall_s": wall, "bitalloc_cpu_s": cpu, "bitalloc_work": work,
            "reference_measured_configs": len(ref_cfgs),
            "reference_measured_wall_s": ref_wall, "reference_measured_cpu_s": ref_cpu,
            "reference_extrapolated_wall_s": ref_wall * scale,
            "reference_extrapolated_cpu_s": ref_cpu * scale,
            "speedup_wall": ref_wall * scale / wall, "speedup_cpu": ref_cpu * scale / cpu,
            "one_quantize_per_config_cpu_s": floor,
            "reference_iterations_mean": statistics.mean(r["iterations"] for r in ref_rows),
            "bitalloc_evaluations_per_config": sum(o["evaluations"] for o in ours) / len(ours),
            "error_ratio_vs_reference": summary(rs),
            "bitalloc": ours, "reference": ref_rows,
        }
        if noise_seeds and name.startswith(first_layer):
            if cached and "reference_other_seeds" in cached["rows"][name]:
                other = cached["rows"][name]["reference_other_seeds"]
                if not set(map(str, noise_seeds)) <= set(other):
                    raise SystemExit(f"--reference-from: no reference rows of seeds {noise_seeds} for {name}")
                per_matrix[name]["reference_other_seeds"] = {str(s): other[str(s)] for s in noise_seeds}
            else:
                per_matrix[name]["reference_other_seeds"] = {
                    str(seed): [row["error"] for row in run_reference(W, ref_cfgs, seed)[0]] for seed in noise_seeds
                }
        tot["ours_wall"] += wall
        tot["ours_cpu"] += cpu
        tot["ref_wall"] += ref_wall * scale
        tot["ref_cpu"] += ref_cpu * scale
        tot["work"] += work
        log.info("%s: bitalloc %.1fs cpu, reference %.1fs cpu (extrapolated %.1fs), %.1fx; %s",
                 short, cpu, ref_cpu, ref_cpu * scale, ref_cpu * scale / cpu, summary(rs))

    ablations = {}
    if args.ablations_from:
        if not Path(args.ablations_from).is_file():
            raise SystemExit(f"--ablations-from {args.ablations_from}: no such file")
        other = json.loads(Path(args.ablations_from).read_text())
        ablations = dict(other.get("ablations") or {}, command=other.get("command"), date=other.get("date"))
        _revise_verdicts(ablations)
    elif not args.no_ablations:
        names = [n for n in ablation_names if n in per_matrix]
        ablations = run_ablations({n: mats[n] for n in names}, cfgs, ref_cfgs,
                                  {n: per_matrix[n]["reference"] for n in names}, ABLATIONS,
                                  args.ablation_baselines)
    _revise_verdicts(ablations)
    load_end = os.getloadavg()
    micro_cfgs = cfgs[::23]
    first = {k: v for k, v in mats.items() if k.startswith(first_layer)}
    micro = {"configs": [c.name for c in micro_cfgs], "tuned_malloc": quant_micro(first, micro_cfgs)} if on_cpu else {}
    q_name = first_layer + "self_attn.q_proj"
    if not args.quick and on_cpu and q_name in mats:
        micro["decompose_many_q_proj_cpu_s_tuned_malloc"] = malloc_ab(mats[q_name], cfgs)
        try:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--quant-micro-json", "--threads", str(args.threads)]
            res = subprocess.run(cmd, capture_output=True, text=True, check=True)
            child = json.loads(res.stdout.strip().splitlines()[-1])
            micro["glibc_default_malloc"] = child["quant"]
            micro["decompose_many_q_proj_cpu_s_glibc_default_malloc"] = child["decompose_many_q_proj_cpu_s"]
        except (subprocess.CalledProcessError, ValueError, IndexError) as exc:
            log.warning("micro-benchmark child failed: %s", exc)

    result = {
        "benchmark": "bench/profile_speed.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": args.threads,
            "device": str(device) if on_cpu else f"{device} ({torch.cuda.get_device_name(device)})",
            "load_average_start": list(load_start), "load_average_end": list(load_end),
        },
        "matrices_done": f"{len(per_matrix)} of {len(mats)}",
        "matrices_source": source,
        "configs": len(cfgs), "space": "config_space('lqlora', ranks=(64,))" + (" [::12]" if args.quick else ""),
        "policy": BASELINE.to_dict(),
        "reference_subset": f"every {args.ref_every}th config (indices 0, {args.ref_every}, ...): {len(ref_cfgs)} configs",
        "reference_source": ({k: cached[k] for k in ("command", "date", "load_average")} | {"file": args.reference_from})
        if cached else None,
        "totals": {
            "bitalloc_wall_s": tot["ours_wall"], "bitalloc_cpu_s": tot["ours_cpu"], "bitalloc_work": tot["work"],
            "reference_extrapolated_wall_s": tot["ref_wall"], "reference_extrapolated_cpu_s": tot["ref_cpu"],
            "speedup_wall": tot["ref_wall"] / tot["ours_wall"], "speedup_cpu": tot["ref_cpu"] / tot["ours_cpu"],
            "one_quantize_per_config_cpu_s": tot["floor_cpu"],
            "speedup_ceiling_at_one_quantize_per_config": tot["ref_cpu"] / tot["floor_cpu"],
        },
        "error_ratio_vs_reference": summary(all_ratios),
        "error_ratio_vs_reference_unstored_factors": summary(all_unstored),
        "reference_best_iterate_over_last": summary(all_best),
        "reference_noise": reference_noise(per_matrix, noise_seeds),
        "bitalloc_noise": bitalloc_noise(mats, per_matrix, cfgs, args.bitalloc_seeds),
        "ablations": ablations,
        "quantizer_micro_benchmark": micro,
        "per_matrix": per_matrix,
    }
    if args.full_model:
        result["full_model"] = run_full_models(args.full_model, args.threads)
    _write_results(out, result)
    return 0


def run_full_models(specs: list[str], threads: int) -> dict:
    """Time ``bitalloc profile --no-fisher --space S --ranks R [--jobs J]`` of the built-in model per spec."""
    from bitalloc.models import find_targets, load_model

    model, _ = load_model(None)
    names = [n for n, _ in find_targets(model)]
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    out = {}
    for spec in specs:
        space, every, ranks, jobs = parse_full_spec(spec)
        cmd = [str(Path(sys.executable).with_name("bitalloc")), "profile", "--no-fisher", "--no-act", "--no-kl", "--space", space,
               "--ranks", ranks, "--device", "cpu"] + (["--jobs", jobs] if jobs else [])
        subset = None
        if every:
            subset = layers[:: int(every)]
            cmd += ["--include", r"\.layers\.(" + "|".join(map(str, subset)) + r")\."]
        with tempfile.TemporaryDirectory() as tmp:
            cmd += ["--out", str(Path(tmp) / "profile")]
            load0 = os.getloadavg()
            t0 = time.perf_counter()
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
            wall = time.perf_counter() - t0
            load1 = os.getloadavg()
            meta = json.loads((Path(tmp) / "profile" / "meta.json").read_text())
        n_mat, n_cfg = len(meta["work"]), len(meta["configs"])
        factor = len(names) / n_mat
        out[spec] = {
            "command": " ".join(["bitalloc", *cmd[1:-2]]) + " --out DIR",
            "matrices": n_mat, "all_matrices": len(names), "configs_per_matrix": n_cfg,
            "layers": subset if subset is not None else "all",
            "wall_s": wall, "configs_per_s": n_mat * n_cfg / wall,
            "extrapolated_full_model_wall_s": wall * factor if subset is not None else None,
            "load_average_start": list(load0), "load_average_end": list(load1),
            "torch_threads": threads, "cpu_count": os.cpu_count(), "ranks": meta["ranks"],
            "jobs": jobs or "auto", "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        log.info("full model %s: %.1f s wall for %d matrices x %d configs", spec, wall, n_mat, n_cfg)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
