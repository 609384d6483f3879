"""Speed benchmark: bitalloc's decompose_many against the faithful LQ-LoRA loop.

For the 7 target matrices of a layer of the built-in model (SmolLM2-135M: q_proj 576x576,
k_proj/v_proj 192x576, o_proj 576x576, gate/up 1536x576, down 576x1536) and the full
``config_space("lqlora", ranks=(64,))`` (288 configs), on one device, in one run:

* bitalloc: ``decompose_many(W, all 288 configs)`` per matrix (wall and CPU time);
* the reference (``bench/_lqlora_reference.py``: every (matrix, config) alone, cold start,
  randomized SVD, stop at the first rise, keep the last iterate) on every ``--ref-every``-th
  config (a deterministic stride through the config list, so every bits/block/scale setting
  is represented); its time is extrapolated to all configs (labelled as such), and errors
  are compared only on the configs it ran;
* ablations on two matrices (k_proj, q_proj; same reference subset): what each trick buys.

Writes ``reports/profile_speed/results.json`` and ``results.md``. ``--quick`` runs a small
subset for development. Timings on a shared machine are noisy: CPU time of this process is
reported beside wall time, and both methods run interleaved, matrix by matrix.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import logging
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _lqlora_reference import lqlora_reference  # noqa: E402

from bitalloc.configs import QuantConfig, config_space  # noqa: E402
from bitalloc.lowrank import decompose_many  # noqa: E402

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
ABLATION_MATRICES = ("self_attn.k_proj", "self_attn.q_proj")


def load_matrices(layers: list[int]) -> tuple[dict[str, torch.Tensor], str]:
    """The target matrices of ``layers`` of the built-in model, or seeded N(0, 0.02^2) stand-ins."""
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
    """Wall and process-CPU seconds of a block."""

    def __enter__(self) -> "Clock":
        self.w0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.w0
        self.cpu = time.process_time() - self.c0


def run_reference(W: torch.Tensor, cfgs: list[QuantConfig]) -> tuple[list[dict], float, float]:
    rows, wall, cpu = [], 0.0, 0.0
    for c in cfgs:
        with Clock() as t:
            r = lqlora_reference(W, c)
        wall, cpu = wall + t.wall, cpu + t.cpu
        rows.append({
            "config": c.name, "error": r.error, "error_unstored": r.error_unstored,
            "best_iterate_error": r.best_error, "iterations": r.iterations,
            "wall_s": t.wall, "cpu_s": t.cpu,
        })
    return rows, wall, cpu


def run_bitalloc(W: torch.Tensor, cfgs: list[QuantConfig], **kw) -> tuple[list[dict], float, float]:
    with Clock() as t:
        ds = decompose_many(W, cfgs, **kw)
    rows = [{"config": d.cfg.name, "error": d.error, "iterations": d.iterations,
             "evaluations": len(d.history)} for d in ds]
    return rows, t.wall, t.cpu


def quantize_floor(W: torch.Tensor, cfgs: list[QuantConfig]) -> float:
    """CPU seconds of one ``quantize(W, c).dequantize()`` per config: a floor for any method
    that must produce each config's Q (every method here calls it at least once per config)."""
    from bitalloc.quant import quantize

    with Clock() as t:
        for c in cfgs:
            quantize(W, c).dequantize()
    return t.cpu


def ratios(ours: list[dict], ref: list[dict], key: str = "error") -> list[float]:
    by = {r["config"]: r for r in ours}
    return [by[r["config"]]["error"] / r[key] for r in ref if r[key] > 0]


def summary(rs: list[float]) -> dict:
    if not rs:
        return {}
    return {
        "n": len(rs), "max": max(rs), "median": statistics.median(rs), "min": min(rs),
        "worse_than_1pct": sum(x > 1.01 for x in rs),
    }


ABLATIONS = {
    # name -> (decompose_many kwargs, what it shows)
    "bitalloc (default)": ({}, "everything on"),
    "tol 1e-3": ({"tol": 1e-3}, "a tighter stopping rule"),
    "twins iterate": ({"twin_iters": 50}, "fp16/fp32 twins iterate instead of reusing factors"),
    "no sharing": ({"share": False}, "each config alone from a cold start"),
    "no sharing, plain steps": ({"share": False, "relax": 1.0, "momentum": 0.0},
                                "... and plain alternation (no over-relaxation/momentum)"),
    "no sharing, plain, fresh sketch": ({"share": False, "relax": 1.0, "momentum": 0.0,
                                         "warm_subspace": False},
                                        "... and a fresh randomized SVD every step (LQ-LoRA's) "
                                        "instead of one subspace pass; still best iterate + "
                                        "our stopping rule"),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configs and two matrices (development)")
    ap.add_argument("--layers", default="0", help="comma-separated layer indices (default 0: 7 matrices)")
    ap.add_argument("--ref-every", type=int, default=4, help="run the reference on every N-th config")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see results.md)")
    ap.add_argument("--no-ablations", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "reports" / "profile_speed"))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    layers = [int(x) for x in args.layers.split(",")]
    mats, source = load_matrices(layers)
    cfgs = config_space("lqlora", ranks=(64,))
    if args.quick:
        cfgs = cfgs[::12]
        mats = {k: v for k, v in mats.items() if k.endswith(ABLATION_MATRICES)}
    ref_idx = list(range(0, len(cfgs), args.ref_every))
    ref_cfgs = [cfgs[i] for i in ref_idx]
    log.info("%d matrices, %d configs, reference on %d", len(mats), len(cfgs), len(ref_cfgs))

    per_matrix, all_ratios, all_unstored, all_best = {}, [], [], []
    tot = {"ours_wall": 0.0, "ours_cpu": 0.0, "ref_wall": 0.0, "ref_cpu": 0.0, "floor_cpu": 0.0}
    ablations: dict[str, dict] = {}
    for name, W in mats.items():
        short = name.split(".", 3)[-1]
        ref_rows, ref_wall, ref_cpu = run_reference(W, ref_cfgs)
        ours, wall, cpu = run_bitalloc(W, cfgs)
        floor = quantize_floor(W, cfgs)
        tot["floor_cpu"] += floor
        scale = len(cfgs) / len(ref_cfgs)
        rs = ratios(ours, ref_rows)
        all_ratios += rs
        all_unstored += ratios(ours, ref_rows, "error_unstored")
        all_best += [r["best_iterate_error"] / r["error"] for r in ref_rows if r["error"] > 0]
        per_matrix[name] = {
            "shape": list(W.shape),
            "bitalloc_wall_s": wall, "bitalloc_cpu_s": cpu,
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
        tot["ours_wall"] += wall
        tot["ours_cpu"] += cpu
        tot["ref_wall"] += ref_wall * scale
        tot["ref_cpu"] += ref_cpu * scale
        log.info("%s: bitalloc %.1fs cpu, reference %.1fs cpu (extrapolated %.1fs), %.1fx; %s",
                 short, cpu, ref_cpu, ref_cpu * scale, ref_cpu * scale / cpu, summary(rs))
        if not args.no_ablations and name.endswith(ABLATION_MATRICES):
            for label, (kw, what) in ABLATIONS.items():
                if label == "bitalloc (default)":
                    rows, w, c = ours, wall, cpu
                    n = len(cfgs)
                elif kw.get("share") is False:  # no sharing: each config alone, on the ref subset
                    rows, w, c = run_bitalloc(W, ref_cfgs, **kw)
                    n = len(ref_cfgs)
                else:
                    rows, w, c = run_bitalloc(W, cfgs, **kw)
                    n = len(cfgs)
                a = ablations.setdefault(label, {"what": what, "cpu_s_per_config": [], "ratios": [],
                                                 "evaluations": 0, "configs": 0})
                a["cpu_s_per_config"].append(c / n)
                a["ratios"] += ratios(rows, ref_rows)
                a["evaluations"] += sum(r["evaluations"] for r in rows)
                a["configs"] += n
                log.info("  ablation %-32s %.3fs cpu/config %s", label, c / n, summary(ratios(rows, ref_rows)))

    ref_cpu_per_config = {
        name: pm["reference_measured_cpu_s"] / pm["reference_measured_configs"]
        for name, pm in per_matrix.items() if name.endswith(ABLATION_MATRICES)
    }
    ablation_rows = []
    for label, a in ablations.items():
        cpu_pc = sum(a["cpu_s_per_config"])  # summed over the ablation matrices
        ref_pc = sum(ref_cpu_per_config.values())
        ablation_rows.append({
            "variant": label, "what": a["what"], "cpu_s_per_config_summed": cpu_pc,
            "speedup_vs_reference_cpu": ref_pc / cpu_pc,
            "quantize_calls_per_config": a["evaluations"] / a["configs"],
            "error_ratio_vs_reference": summary(a["ratios"]),
        })

    result = {
        "benchmark": "bench/profile_speed.py",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.executable).name, "bench/profile_speed.py", *sys.argv[1:]]),
        "machine": {
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "torch_threads": args.threads,
            "device": "cpu",
        },
        "matrices_source": source,
        "configs": len(cfgs), "space": "config_space('lqlora', ranks=(64,))" + (" [::12]" if args.quick else ""),
        "reference_subset": f"every {args.ref_every}th config (indices 0, {args.ref_every}, ...): {len(ref_cfgs)} configs",
        "totals": {
            "bitalloc_wall_s": tot["ours_wall"], "bitalloc_cpu_s": tot["ours_cpu"],
            "reference_extrapolated_wall_s": tot["ref_wall"], "reference_extrapolated_cpu_s": tot["ref_cpu"],
            "speedup_wall": tot["ref_wall"] / tot["ours_wall"], "speedup_cpu": tot["ref_cpu"] / tot["ours_cpu"],
            "one_quantize_per_config_cpu_s": tot["floor_cpu"],
            "speedup_ceiling_at_one_quantize_per_config": tot["ref_cpu"] / tot["floor_cpu"],
        },
        "error_ratio_vs_reference": summary(all_ratios),
        "error_ratio_vs_reference_unstored_factors": summary(all_unstored),
        "reference_best_iterate_over_last": summary(all_best),
        "ablations": ablation_rows,
        "per_matrix": per_matrix,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(render_md(result))
    log.info("wrote %s", out)
    return 0


def _fmt(s: dict) -> str:
    if not s:
        return "-"
    return f"max {s['max']:.3f}, median {s['median']:.3f}, >1% worse: {s['worse_than_1pct']}/{s['n']}"


NOTES = """## Notes

- **Reference** (`bench/_lqlora_reference.py`): LQ-LoRA's loop for each (matrix, config) alone:
  Q = 0; up to 100 times {`torch.svd_lowrank(W - Q, q=r+10, niter=2)` truncated to r, balanced
  split; Q = quantize(W - L1 L2); stop at the first rise of the error}; keep the last iterate.
  Its "error" here is that of the factors as the config stores them (bf16) with its Q; the
  in-loop number with unrounded factors is reported too ("unstored").
- **bitalloc** (`decompose_many`): per (bits, block) group a leader solved cold; the fp16 twin
  of a 3-4 bit config with 3+ scale bits reuses its fp32 twin's factors (one quantize); other
  twins (NF8, NF2, 2-bit scales) iterate from the twin's factors; other configs start from the
  nearest solved config, except NF2 codes and 2-bit scales, which start cold (another
  quantizer's optimum is a poor start there); over-relaxed steps with momentum for 3-8 bits;
  one subspace pass per step reusing the last subspace; Q quantized against the stored (bf16)
  factors; best iterate; stop when the best fell < 1% over 2 steps.
- Both call the same `bitalloc.quant.quantize` (with bit packing) once per step; on this CPU it
  is most of a step's cost, so the speedup is bounded by how many quantize calls are saved.
- The machine is shared with other jobs: CPU time of this process is the steadier number;
  torch runs 1 thread (`--threads`) so that both methods see the same, uncontended setup.
"""


def _rounding(r: dict, bits: int | None) -> dict:
    rs = [
        row["error"] / row["error_unstored"]
        for pm in r["per_matrix"].values() for row in pm["reference"]
        if row["error_unstored"] > 0 and (bits is None or row["config"].startswith(f"nf{bits}-"))
    ]
    return summary(rs)


def render_md(r: dict) -> str:
    t = r["totals"]
    lines = [
        "# profile_speed: bitalloc `decompose_many` vs the LQ-LoRA loop",
        "",
        f"- date: {r['date']}",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']['platform']}, {r['machine']['cpu_count']} CPUs, torch "
        f"{r['machine']['torch']}, {r['machine']['torch_threads']} torch thread(s), device cpu",
        f"- matrices: {r['matrices_source']}",
        f"- configs: {r['configs']} ({r['space']}), rank 64",
        f"- reference: {r['reference_subset']}; its time for all configs is **extrapolated** "
        "(measured time x configs / measured configs); errors are compared on measured entries only",
        "",
        "## Totals",
        "",
        "| | bitalloc (measured) | reference (extrapolated) | speedup |",
        "| --- | ---: | ---: | ---: |",
        f"| CPU time | {t['bitalloc_cpu_s']:.1f} s | {t['reference_extrapolated_cpu_s']:.1f} s | {t['speedup_cpu']:.1f}x |",
        f"| wall time | {t['bitalloc_wall_s']:.1f} s | {t['reference_extrapolated_wall_s']:.1f} s | {t['speedup_wall']:.1f}x |",
        "",
        f"One `quantize(W, c).dequantize()` per config, nothing else, takes "
        f"{t['one_quantize_per_config_cpu_s']:.1f} s CPU: no method that computes every config's Q "
        f"can beat the reference by more than {t['speedup_ceiling_at_one_quantize_per_config']:.1f}x here.",
        "",
        f"Error of bitalloc / error of the reference, per measured (matrix, config): "
        f"{_fmt(r['error_ratio_vs_reference'])}.",
        "",
        f"Against the reference's in-loop number (its factors unrounded, not what the config "
        f"stores): {_fmt(r['error_ratio_vs_reference_unstored_factors'])}.",
        "",
        f"The reference's own best iterate / the last one it returns: "
        f"{_fmt(r['reference_best_iterate_over_last'])}.",
        "",
        f"Rounding the reference's factors to bf16 after its loop (its stored / in-loop error): "
        f"{_fmt(_rounding(r, None))}; NF8 configs alone: {_fmt(_rounding(r, 8))}. bitalloc "
        "quantizes Q against the rounded factors, which absorbs that rounding.",
        "",
        "## Per matrix",
        "",
        "| matrix | shape | bitalloc CPU s | reference CPU s (measured / extrapolated) | speedup (CPU) | "
        "ref. iterations (mean) | bitalloc quantize calls / config | error ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, pm in r["per_matrix"].items():
        lines.append(
            f"| {name} | {pm['shape'][0]}x{pm['shape'][1]} | {pm['bitalloc_cpu_s']:.1f} | "
            f"{pm['reference_measured_cpu_s']:.1f} / {pm['reference_extrapolated_cpu_s']:.1f} | "
            f"{pm['speedup_cpu']:.1f}x | {pm['reference_iterations_mean']:.1f} | "
            f"{pm['bitalloc_evaluations_per_config']:.2f} | {_fmt(pm['error_ratio_vs_reference'])} |"
        )
    if r["ablations"]:
        lines += [
            "",
            "## What each trick buys (k_proj + q_proj, errors on the reference subset)",
            "",
            "| variant | what | CPU s / config (summed over the 2 matrices) | speedup vs reference (CPU) | "
            "quantize calls / config | error ratio vs reference |",
            "| --- | --- | ---: | ---: | ---: | --- |",
        ]
        for a in r["ablations"]:
            lines.append(
                f"| {a['variant']} | {a['what']} | {a['cpu_s_per_config_summed']:.3f} | "
                f"{a['speedup_vs_reference_cpu']:.1f}x | {a['quantize_calls_per_config']:.2f} | "
                f"{_fmt(a['error_ratio_vs_reference'])} |"
            )
    lines += ["", NOTES]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
