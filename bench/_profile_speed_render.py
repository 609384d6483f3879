"""The markdown page of bench/profile_speed.py: ``render_md(results)`` from its results.json.

Pure functions of the results dictionary (no torch, no timing), so a page can be rewritten
from a results.json alone (``profile_speed.py --render-only``).
"""

from __future__ import annotations

import statistics


def summary(rs: list[float]) -> dict:
    """Count, extremes, median and entries more than 1% above 1 of a list of error ratios."""
    if not rs:
        return {}
    return {
        "n": len(rs), "max": max(rs), "median": statistics.median(rs), "min": min(rs),
        "worse_than_1pct": sum(x > 1.01 for x in rs),
    }


def parse_full_spec(spec: str) -> tuple[str, str, str, str | None]:
    """``SPACE[@EVERY][:ranks=R][:jobs=J]`` -> ``(space, every, ranks, jobs)``; ranks default 64."""
    head, *opts = spec.split(":")
    space, _, every = head.partition("@")
    options = dict(o.split("=", 1) for o in opts)
    unknown = set(options) - {"ranks", "jobs"}
    if unknown:
        raise SystemExit(f"--full-model {spec}: unknown option(s) {sorted(unknown)} (ranks=, jobs=)")
    return space, every, options.get("ranks", "64"), options.get("jobs")


def _fmt(s: dict) -> str:
    if not s:
        return "-"
    return f"max {s['max']:.3f}, median {s['median']:.3f}, >1% worse: {s['worse_than_1pct']}/{s['n']}"


NOTES = """## Notes

- **Reference** (`bench/_lqlora_reference.py`): LQ-LoRA's loop for each (matrix, config) alone:
  Q = 0; up to 100 times {`torch.svd_lowrank(W - Q, q=r+10, niter=2)` truncated to r, balanced
  split; Q = quantize(W - L1 L2); stop at the first rise of the error}; keep the last iterate.
  Its "error" here is that of the factors as the config stores them (bf16) with its Q; the
  in-loop number with unrounded factors is reported too ("unstored"). It quantizes with the
  same packing-free `quantize_dequantize` as bitalloc (bit for bit `quantize(...).dequantize()`;
  on the CPU through the same compiled kernels), with the same malloc setting and torch thread
  count, so the speedup is that of the algorithm, not of the quantizer. It is seeded: read
  from an earlier results.json (`--reference-from`), its errors are those it computes.
- **bitalloc** (`decompose_many` with its default `LoopPolicy`, `bitalloc.lowrank.MANY_CONFIGS`):
  per (bits, block) group a leader solved cold (the most precise scales; for NF2 the
  coarsest); every fp16/fp32 twin reuses its
  twin's factors (one quantize); other configs start from the nearest solved config (NF2: the
  nearest coarser one), except 2-bit scales of NF3-NF8, which start cold; every cold start
  shares one first step, the exact SVD of W (computed once per matrix), and its second step
  draws a fresh sketch with 2 power iterations; over-relaxed steps with momentum for 3-8 bits
  (1.5 with momentum 0.4 for NF3 and 0.5 for NF4; NF8 2.5 with 0.3), retreating to plain
  alternation (never below) after a rise, except NF8 with 2-4 bit scales, which keeps its
  steps; plain steps that rise go on; one subspace pass per later step reusing the last
  subspace (k = r columns, orthonormalized through a Cholesky factor of their Gram matrix),
  its small SVD through a Gram eigendecomposition, and (where bfloat16 products are native)
  the dense part of its target multiplied in bfloat16; Q quantized against the stored (bf16)
  factors with the packing-free quantizer and packed only when `Decomposition.q` is read;
  best iterate; stop when the best fell by less than tol x {NF2: 1, NF3: 2, NF4/NF8: 4}
  (tol = 1e-2) over 2 steps (3 for NF8 with 2-4 bit scales) and by less than 3 times that
  over twice as many; then, for NF3, NF4 and NF8 with
  3-4 bit scales, a repair pass: a config that ended above a config with coarser scales by
  more than 5% (NF3, NF4) or 10% (NF8) is solved again from that config's factors, and the
  lower result kept.
- **Work** is the number of quantizations (of the whole matrix) times the matrix's entries:
  a deterministic count, unlike a time on a shared machine.
- glibc returns freed multi-MB blocks to the OS by default, so each temporary of the loop
  page-faults in again; bitalloc raises the trim threshold (`LoopPolicy.keep_freed_memory`).
  The micro-benchmark shows what that buys.
- The machine is shared with other jobs (see the load averages): CPU time of this process is
  the steadier number; torch runs 1 thread (`--threads`) so that both methods see the same
  setup. The full-model profiles run the CLI in a child process with `OMP_NUM_THREADS` set to
  the same thread count.
"""


def _goals(r: dict) -> list[str]:
    """Where the measurements stand against the goals (computed, not typed in)."""
    t, e = r["totals"], r["error_ratio_vs_reference"]
    # on the CPU, process CPU time (steadier on a shared machine); on a GPU, wall time
    key, other = ("speedup_cpu", "speedup_wall") if _device(r) == "cpu" else ("speedup_wall", "speedup_cpu")
    unit, other_unit = ("CPU" if k == "speedup_cpu" else "wall" for k in (key, other))
    lines = [
        "## Against the goals",
        "",
        f"- at least 20x faster than the reference: **{t[key]:.1f}x** {unit}, {t[other]:.1f}x {other_unit} "
        f"({'met' if t[key] >= 20 else 'not met'});",
        f"- no entry more than 1% worse: **{e['worse_than_1pct']}/{e['n']}** are, the worst by "
        f"{100 * (e['max'] - 1):.1f}% ({'met' if e['worse_than_1pct'] == 0 else 'not met'}); by code width: "
        f"{_by_bits(r)};",
    ]
    for key, f in r.get("full_model", {}).items():
        space = parse_full_spec(key)[0]
        goal_min = {"lqlora": 15, "default": 3}.get(space)
        if goal_min is None:
            continue
        full = f["extrapolated_full_model_wall_s"] or f["wall_s"]
        how = "extrapolated from every " + spec_every(f) + " layer" if f["extrapolated_full_model_wall_s"] else "measured"
        lines.append(f"- full `{space}` profile of the built-in model under {goal_min} min on this machine, "
                     f"ranks {f.get('ranks', [64])}, {f.get('jobs', 1)} worker process(es) (`{key}`): "
                     f"**{full / 60:.1f} min** ({how}; {'met' if full <= 60 * goal_min else 'not met'});")
    return lines + [""]


def _device(r: dict) -> str:
    """The device both methods ran on, as the results name it ("cpu" where none is named)."""
    return r["machine"].get("device", "cpu")


def spec_every(f: dict) -> str:
    layers = f["layers"]
    return f"{layers[1] - layers[0]}th" if isinstance(layers, list) and len(layers) > 1 else "selected"


def _by_bits(r: dict) -> str:
    """Entries more than 1% worse than the reference, by code width."""
    bad: dict[str, list[int]] = {}
    for pm in r["per_matrix"].values():
        ours = {o["config"]: o["error"] for o in pm["bitalloc"]}
        for row in pm["reference"]:
            key = row["config"].split("-")[0].upper()
            n = bad.setdefault(key, [0, 0])
            n[1] += 1
            n[0] += ours[row["config"]] > 1.01 * row["error"]
    return ", ".join(f"{k}: {v[0]}/{v[1]}" for k, v in sorted(bad.items()))


def _rounding(r: dict, bits: int | None) -> dict:
    rs = [
        row["error"] / row["error_unstored"]
        for pm in r["per_matrix"].values() for row in pm["reference"]
        if row["error_unstored"] > 0 and (bits is None or row["config"].startswith(f"nf{bits}-"))
    ]
    return summary(rs)


def _noise(n: dict | None) -> list[str]:
    """The reference's run-to-run spread, and bitalloc against the median of its seeds."""
    if not n:
        return []
    rows = [("the reference, another seed / seed 0", n["reference_other_seed_over_seed0"]),
            ("bitalloc / the reference's seed 0", n["bitalloc_over_reference_seed0"]),
            ("bitalloc / the median of the reference's seeds", n["bitalloc_over_reference_median"])]
    keys = [k for k in rows[0][1] if k != "all"]
    lines = [
        "## The reference against itself",
        "",
        f"The reference draws a random sketch each step, so its result depends on the seed. On "
        f"{len(n['matrices'])} matrices (every entry of the reference subset there) it was rerun with seeds "
        f"{', '.join(map(str, n['seeds'][1:]))}; each cell: entries more than 1% worse / entries (max ratio).",
        "",
        "| ratio | all | " + " | ".join(keys) + " |",
        "| --- | ---: | " + " | ".join("---:" for _ in keys) + " |",
    ]
    for label, t in rows:
        cells = [f"{t[k]['worse_than_1pct']}/{t[k]['n']} ({t[k]['max']:.3f})" for k in ["all", *keys]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines + [""]


def _own_noise(n: dict | None, command: str | None) -> list[str]:
    """bitalloc against itself: other seeds."""
    if not n:
        return []
    seeds = list(n["per_seed"])
    bits = list(n["per_seed"][seeds[0]]["vs_seed0"])
    lines = [
        "## bitalloc against itself",
        "",
        f"`decompose_many` draws random sketches too (its `seed`). Rerun with seeds {', '.join(seeds)} on all "
        f"{n['matrices']} matrices" + (f" (`{command}`, after the main run)" if command else "") + ". "
        "Against its own seed-0 run, each cell: entries more than 1% worse / more than 1% better (of all "
        "entries of that code width); the median of |log(ratio)|; the largest ratio.",
        "",
        "| seed | CPU s | against the reference (measured entries) | " + " | ".join(
            f"{b} against seed 0" for b in bits) + " |",
        "| ---: | ---: | --- | " + " | ".join("---" for _ in bits) + " |",
    ]
    for seed, d in n["per_seed"].items():
        cells = [f"{v['worse_than_1pct']} / {v['better_than_1pct']} (of {v['n']}) / {v['median_abs_log']:.4f} / "
                 f"{v['max']:.2f}" for v in d["vs_seed0"].values()]
        lines.append(f"| {seed} | {d['cpu_s']:.1f} | {_fmt(d['vs_reference'])} | " + " | ".join(cells) + " |")
    return lines + [""]


def render_md(r: dict) -> str:
    t = r["totals"]
    k = "cpu" if _device(r) == "cpu" else "wall"  # the per-matrix times shown
    u = k.upper() if k == "cpu" else k
    lines = [
        "# profile_speed: bitalloc `decompose_many` vs the LQ-LoRA loop",
        "",
        f"- date: {r['date']}",
        f"- command: `{r['command']}`",
        f"- machine: {r['machine']['platform']}, {r['machine']['cpu_count']} CPUs, torch "
        f"{r['machine']['torch']}, {r['machine']['torch_threads']} torch thread(s), device {_device(r)}; "
        "load average (1/5/15 min) at start " + "/".join(f"{x:.1f}" for x in r['machine'].get('load_average_start', [])) +
        ", at end " + "/".join(f"{x:.1f}" for x in r['machine'].get('load_average_end', [])),
        f"- matrices: {r['matrices_source']}" + (f"; done: {r['matrices_done']}" if "matrices_done" in r else ""),
        *_reference_source(r.get("reference_source"), r["machine"].get("load_average_start")),
        *(f"- note: {n}" for n in r.get("notes", [])),
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
        f"One `quantize_dequantize(W, c)` per config, nothing else, takes "
        f"{t['one_quantize_per_config_cpu_s']:.1f} s CPU: no method that computes every config's Q "
        f"can beat the reference by more than {t['speedup_ceiling_at_one_quantize_per_config']:.1f}x here.",
        "",
        f"Error of bitalloc / error of the reference, per measured (matrix, config): "
        f"{_fmt(r['error_ratio_vs_reference'])}. More than 1% worse, by code width: {_by_bits(r)}.",
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
        *_goals(r),
        *_noise(r.get("reference_noise")),
        *_own_noise(r.get("bitalloc_noise"), r.get("bitalloc_noise_command")),
        "## Per matrix",
        "",
        f"| matrix | shape | bitalloc {u} s | reference {u} s (measured / extrapolated) | speedup ({u}) | "
        "ref. iterations (mean) | bitalloc quantize calls / config | error ratio |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, pm in r["per_matrix"].items():
        lines.append(
            f"| {name} | {pm['shape'][0]}x{pm['shape'][1]} | {pm[f'bitalloc_{k}_s']:.1f} | "
            f"{pm[f'reference_measured_{k}_s']:.1f} / {pm[f'reference_extrapolated_{k}_s']:.1f} | "
            f"{pm[f'speedup_{k}']:.1f}x | {pm['reference_iterations_mean']:.1f} | "
            f"{pm['bitalloc_evaluations_per_config']:.2f} | {_fmt(pm['error_ratio_vs_reference'])} |"
        )
    lines += _ablations(r.get("ablations"), r.get("quantizer_micro_benchmark") or {})
    micro = r.get("quantizer_micro_benchmark")
    if micro:
        lines += [
            "",
            "## Quantizer micro-benchmark (ms per call, best of 3, over "
            f"{len(micro['configs'])} configs of the space)",
            "",
            "| shape | quantize(...).dequantize() (packs) | quantize_dequantize | the same two, glibc malloc defaults |",
            "| --- | ---: | ---: | ---: |",
        ]
        default = micro.get("glibc_default_malloc", {})
        for shape, row in micro["tuned_malloc"].items():
            d = default.get(shape, {})
            keys = ("quantize_dequantize_ms", "fast_path_ms")
            dd = " / ".join(f"{d.get(k, float('nan')):.2f}" for k in keys)
            cells = " | ".join(f"{row[k]:.2f}" if k in row else "n/a" for k in keys)
            lines.append(f"| {shape} | {cells} | {dd} |")
        if {"decompose_many_q_proj_cpu_s_glibc_default_malloc", "decompose_many_q_proj_cpu_s_tuned_malloc"} <= set(micro):
            lines += ["", "The whole loop, `decompose_many` on q_proj of the first layer with all configs: "
                      f"{micro['decompose_many_q_proj_cpu_s_tuned_malloc']:.1f} s CPU with bitalloc's malloc "
                      f"setting, {micro['decompose_many_q_proj_cpu_s_glibc_default_malloc']:.1f} s with glibc's "
                      "defaults (child process, `LoopPolicy(keep_freed_memory=False)`)."]
    full = r.get("full_model")
    if full:
        lines += [
            "",
            "## Full-model profiles",
            "",
            "| spec | command | matrices (of all) | configs / matrix | wall time | configs / s | "
            "full model (extrapolated) | load average (1/5/15 min) start -> end |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        if r.get("full_model_command"):
            lines[-2:-2] = [f"Run apart from the main comparison with `{r['full_model_command']}`; each row ended at "
                            + ", ".join(f"{f['date']} ({spec})" for spec, f in full.items() if f.get("date")) + ".", ""]
        for spec, f in full.items():
            extra = f["extrapolated_full_model_wall_s"]
            extra_s = "(measured)" if extra is None else f"{extra:.0f} s = {extra / 60:.1f} min (x{f['all_matrices'] / f['matrices']:.1f})"
            la0 = "/".join(f"{x:.1f}" for x in f["load_average_start"])
            la1 = "/".join(f"{x:.1f}" for x in f["load_average_end"])
            command = f["command"].replace("|", "\\|")  # a bare | would split the table cell
            lines.append(
                f"| {spec} | `{command}` | {f['matrices']} ({f['all_matrices']}) | "
                f"{f['configs_per_matrix']} | {f['wall_s']:.0f} s = {f['wall_s'] / 60:.1f} min | "
                f"{f['configs_per_s']:.1f} | {extra_s} | {la0} -> {la1} |"
            )
        first = next(iter(full.values()))
        lines += ["", f"On this {first['cpu_count']}-CPU machine, shared with other jobs, with "
                  f"OMP_NUM_THREADS={first['torch_threads']}; layer subsets are every N-th layer, "
                  "extrapolated by the matrix count (all layers have the same 7 shapes)."]
    lines += ["", NOTES]
    return "\n".join(lines)


def _reference_source(src: dict | None, load_here: list[float] | None) -> list[str]:
    if not src:
        return []
    load = "/".join(f"{x:.1f}" for x in src.get("load_average") or [])
    lines = [f"- the reference's rows (errors and measured times) are read from `{src['file']}`, written by "
             f"`{src['command']}` on {src['date']} on this machine (load average at its start {load}); the "
             "reference is seeded, so its errors are what it computes; its times are from that run"]
    theirs, ours = (src.get("load_average") or [0.0])[0], (load_here or [0.0])[0]
    if abs(ours - theirs) >= 1.0:
        lines.append(f"- **the two methods' times come from runs under different loads** (1-min load average "
                     f"{theirs:.1f} for the reference, {ours:.1f} at the start of this run, see its end too): on "
                     "this shared machine a process's CPU time grows with the load, so the speedups below "
                     "compare unlike conditions; the work and the errors do not depend on the load")
    return lines


def _kept(row: dict) -> str:
    if "kept" not in row:
        return ""
    return ": kept" if row["kept"] else ": removed from LoopPolicy"


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _ablations(a: dict | None, micro: dict) -> list[str]:
    """The knob ablations: what removing each knob of the default LoopPolicy does, and the verdict."""
    if not a:
        return []
    b = a["baseline"]
    runs = ", ".join(f"{x:.1f}" for x in b["cpu_s_runs"])
    names = ", ".join(n.split(".", 3)[-1] for n in a["matrices"])
    lines = [
        "",
        f"## What each knob buys ({names}; errors on the reference subset)",
        "",
        f"Each row sets one `LoopPolicy` knob to its neutral value (`bench/_profile_speed_ablations.py`) "
        f"and runs `decompose_many` on these {len(a['matrices'])} matrices with all {a['configs']} configs "
        f"(rows marked 'alone': the {a['reference_configs']} reference configs, costs scaled per config). "
        f"The default policy ran {len(b['cpu_s_runs'])} times per matrix, interleaved with the variants: "
        f"{runs} s CPU in total per repeat (spread {100 * b['noise']:.1f}%, the noise), work "
        f"{b['work'] / 1e9:.2f} G entry-quantizations, {b['quantize_calls_per_config']:.2f} quantize calls "
        f"per config, errors {_fmt(b['error_ratio_vs_reference'])}. A knob is needed when its removal "
        f"adds entries more than 1% above the reference, costs {100 * a['threshold']:.0f}% or more CPU "
        f"time beyond the noise, or {100 * a['threshold']:.0f}% or more work (and goes when its removal "
        f"saves that much work); a CPU time "
        f"{100 * a['threshold']:.0f}% or more higher but within the noise is 'unclear' (kept).",
        *(["", f"The ablations ran apart from the main comparison, with `{a['command']}` ({a['date']})."]
          if a.get("command") else []),
        "",
        "| knob | variant (the knob at its neutral value) | CPU time | work | quantize calls / config | entries >1% worse (change) | "
        "error ratio vs reference | verdict |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
    ]
    for row in a["rows"]:
        e = row["error_ratio_vs_reference"]
        alone = " (alone)" if row["alone"] else ""
        lines.append(
            f"| `{row['knob']}` | {row['variant']}{alone}: {row['what']} | {_pct(row['cpu_change'])} | "
            f"{_pct(row['work_change'])} | {row['quantize_calls_per_config']:.2f} | "
            f"{e['worse_than_1pct']}/{e['n']} ({row['worse_entries_change']:+d}) | "
            f"max {e['max']:.3f}, median {e['median']:.3f} | {row['verdict']}{_kept(row)} |"
        )
    tuned = micro.get("decompose_many_q_proj_cpu_s_tuned_malloc")
    untuned = micro.get("decompose_many_q_proj_cpu_s_glibc_default_malloc")
    if tuned and untuned:
        lines.append(f"| `keep_freed_memory` | glibc's malloc defaults (q_proj, child process) | "
                     f"{_pct(untuned / tuned - 1)} | +0.0% | - | - (the same errors) | - | "
                     f"{'needed (slower without it)' if untuned / tuned - 1 >= max(a['threshold'], b['noise']) else 'unclear (one run each, within the noise): kept'} |")
    lines += ["", "Not exercised by these matrices (kept, not measured here): "
              + "; ".join(f"`{k}`: {v}" for k, v in a.get("not_exercised", {}).items()
                          if k != "keep_freed_memory") + "."]
    return lines
