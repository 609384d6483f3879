"""Speed benchmark: bitalloc's decompose_many against the faithful LQ-LoRA loop.

For the 7 target matrices of each of ``--layers`` (default 0,1) of the built-in model
(SmolLM2-135M: q_proj 576x576, k_proj/v_proj 192x576, o_proj 576x576, gate/up 1536x576,
down 576x1536) and the full
``config_space("lqlora", ranks=(64,))`` (288 configs), on one device, in one run:

* bitalloc: ``decompose_many(W, all 288 configs)`` per matrix (wall and CPU time);
* the reference (``bench/_lqlora_reference.py``: every (matrix, config) alone, cold start,
  randomized SVD, stop at the first rise, keep the last iterate) on every ``--ref-every``-th
  config (a deterministic stride through the config list, so every bits/block/scale setting
  is represented); its time is extrapolated to all configs (labelled as such), and errors
  are compared only on the configs it ran;
* ablations on two matrices of the first layer (k_proj, q_proj; same reference subset):
  what each trick buys;
* a quantizer micro-benchmark: ``quantize(W, c).dequantize()`` against the packing-free
  ``quantize_dequantize`` (bit-identical), with bitalloc's malloc setting and, in a child
  process, with glibc's defaults (``BITALLOC_MALLOC_DEFAULTS=1``).

``--full-model SPEC`` (repeatable; ``default``, ``lqlora``, or ``lqlora@5`` for every 5th
layer) times ``bitalloc profile --no-fisher --space S --ranks 64`` of the whole built-in
model in a child process (wall time, load average, configs/s; a layer subset is
extrapolated to all layers, labelled as such); with ``--skip-main`` only that runs, merged
into the existing results.

Writes ``reports/profile_speed/results.json`` and ``results.md``. ``--quick`` runs a small
subset for development. Timings on a shared machine are noisy: CPU time of this process is
reported beside wall time, both methods run interleaved, matrix by matrix, with the same
torch thread count, and the load average is recorded.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
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
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from _lqlora_reference import lqlora_reference  # noqa: E402

import bitalloc.lowrank as lowrank  # noqa: E402
from bitalloc.configs import QuantConfig, config_space  # noqa: E402
from bitalloc.lowrank import decompose_many  # noqa: E402
from bitalloc.quant import kernels, quantize, quantize_dequantize  # noqa: E402

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


def run_bitalloc(W: torch.Tensor, cfgs: list[QuantConfig], patch=None, **kw) -> tuple[list[dict], float, float]:
    with (patch() if patch else nullcontext()), Clock() as t:
        ds = decompose_many(W, cfgs, **kw)
    rows = [{"config": d.cfg.name, "error": d.error, "iterations": d.iterations,
             "evaluations": len(d.history)} for d in ds]
    return rows, t.wall, t.cpu


def quantize_floor(W: torch.Tensor, cfgs: list[QuantConfig]) -> float:
    """CPU seconds of one ``quantize_dequantize(W, c)`` per config: a floor for any method
    that must produce each config's Q (every method here calls it at least once per config)."""
    with Clock() as t:
        for c in cfgs:
            quantize_dequantize(W, c, check=False)
    return t.cpu


def quant_micro(mats: dict[str, torch.Tensor], cfgs: list[QuantConfig], reps: int = 3) -> dict:
    """Milliseconds per call (best of ``reps`` passes over ``cfgs``) of the packing quantizer's
    round trip and of the packing-free fast path, per matrix shape."""
    import bitalloc.quant.nf as nf

    def bucketize_quantize(W, c):
        saved = nf._lut
        nf._lut = lambda bits, device: None  # nf_encode falls back to torch.bucketize
        try:
            return quantize(W, c).dequantize()
        finally:
            nf._lut = saved

    import bitalloc.quant.blockwise as blockwise

    def codes_fast_path(W, c):
        saved = blockwise.nf_round
        blockwise.nf_round = lambda y, bits: nf.nf_decode(nf.nf_encode_index(y, bits), bits)
        try:
            with tensor_code():
                return quantize_dequantize(W, c)
        finally:
            blockwise.nf_round = saved

    def tensor_fast_path(W, c):
        with tensor_code():
            return quantize_dequantize(W, c)

    out = {}
    for name, W in mats.items():
        shape = "x".join(map(str, W.shape))
        if shape in out:
            continue
        row = {}
        for label, fn in (("bucketize_quantize_dequantize_ms", lambda c: bucketize_quantize(W, c)),
                          ("quantize_dequantize_ms", lambda c: quantize(W, c).dequantize()),
                          ("codes_fast_path_ms", lambda c: codes_fast_path(W, c)),
                          ("tensor_fast_path_ms", lambda c: tensor_fast_path(W, c)),
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


def malloc_ab(W: torch.Tensor, cfgs: list[QuantConfig]) -> float:
    """CPU seconds of ``decompose_many(W, cfgs)`` (run in-process and in a child with glibc's
    default malloc settings, to see what keeping freed memory buys on the real loop)."""
    with Clock() as t:
        decompose_many(W, cfgs)
    return t.cpu


@contextmanager
def packing_quantizer():
    """Ablation: the loop quantizes with the packing ``quantize(...).dequantize()``."""
    saved = lowrank._quantize_residual
    lowrank._quantize_residual = lambda x, cfg: x - quantize(x, cfg).dequantize()
    try:
        yield
    finally:
        lowrank._quantize_residual = saved


@contextmanager
def tensor_code():
    """Ablation: no compiled kernels; the quantizer and the loop's error run in tensor code
    (bit-identical values; the default before session 6)."""
    saved = kernels.available
    kernels.available = lambda: False
    try:
        yield
    finally:
        kernels.available = saved


@contextmanager
def nf2_cold_fine_first():
    """Ablation: NF2 as before session 6, from the most precise scales down, every config
    (but a twin) from a cold start."""
    saved_first, saved_plan = lowrank.COARSE_FIRST, lowrank._warm_plan

    def plan(cfg, parent, max_iters, twin_iters):
        if cfg.bits == 2 and parent is not None and not lowrank._is_twin(cfg, parent.cfg) \
                and not lowrank._same_quantizer(cfg, parent.cfg):
            return None, max_iters
        return saved_plan(cfg, parent, max_iters, twin_iters)

    lowrank.COARSE_FIRST, lowrank._warm_plan = frozenset(), plan
    try:
        yield
    finally:
        lowrank.COARSE_FIRST, lowrank._warm_plan = saved_first, saved_plan


@contextmanager
def previous_stopping():
    """Ablation: the previous stopping rule (halve the step after any rise, give up below 0.2,
    the same tolerance and 2 steps of patience for every code width)."""
    saved = lowrank._stop_opts
    lowrank._stop_opts = lambda cfg, tol: {"tol": tol}
    try:
        yield
    finally:
        lowrank._stop_opts = saved


@contextmanager
def previous_tolerances():
    """Ablation: the tolerances before this change ({NF2: 1, NF3/NF4: 2, NF8: 0.3} x tol, and 3
    steps of patience for NF8)."""
    saved_stop, saved_tf = lowrank._stop_opts, dict(lowrank.TOL_FACTOR)
    lowrank.TOL_FACTOR.update({2: 1.0, 3: 2.0, 4: 2.0, 8: 0.3})

    def stop(cfg, tol):
        out = saved_stop(cfg, tol)
        if cfg.bits == 8:
            out["patience"] = 3
        return out

    lowrank._stop_opts = stop
    try:
        yield
    finally:
        lowrank._stop_opts = saved_stop
        lowrank.TOL_FACTOR.clear()
        lowrank.TOL_FACTOR.update(saved_tf)


@contextmanager
def previous_nf8_steps():
    """Ablation: NF8's step and tolerance before this session (relax 1.5, tol x 2)."""
    saved_step, saved_tol = lowrank.STEP[8], lowrank.TOL_FACTOR[8]
    lowrank.STEP[8], lowrank.TOL_FACTOR[8] = (1.5, 0.3), 2.0
    try:
        yield
    finally:
        lowrank.STEP[8], lowrank.TOL_FACTOR[8] = saved_step, saved_tol


@contextmanager
def lowrank_setting(name: str, value: Any):
    """Ablation: another value for a module-level setting of ``bitalloc.lowrank``."""
    saved = getattr(lowrank, name)
    setattr(lowrank, name, value)
    try:
        yield
    finally:
        setattr(lowrank, name, saved)


#: The subspace pass orthonormalizes with a Householder QR (before session 5).
householder_qr = functools.partial(lowrank_setting, "CHOLESKY_QR", False)
#: The warm step forms its target as one float32 matrix (before session 8; now split, the
#: dense part through bfloat16 products).
float32_step_target = functools.partial(lowrank_setting, "LOWP_RESIDUAL", False)
#: Ablation: NF3/NF4 momentum 0.3 (before session 9; now 0.4 and 0.5).
previous_nf34_momentum = functools.partial(
    lowrank_setting, "STEP", {**lowrank.STEP, 3: (1.5, 0.3), 4: (1.5, 0.3)}
)


@contextmanager
def previous_coarse_nf8():
    """Ablation: NF8 with 2-4 bit scales retreats after a rise, with 2 steps of patience, and
    the repair pass re-solves NF8 configs of every scale width (before session 10)."""
    with lowrank_setting("NF8_STOP", {}), \
            lowrank_setting("REPAIR_NF8_SCALE_BITS", frozenset({2, 3, 4, 8})):
        yield


@contextmanager
def session10_loop():
    """Ablation: session 10's repairs and stopping (a repair on any coarser config 1% lower,
    NF3's tolerance x 4, 2 steps of patience for NF8 with 3-4 bit scales)."""
    nf8_stop = {**lowrank.NF8_STOP, 3: {"backtrack": False}, 4: {"backtrack": False}}
    with lowrank_setting("REPAIR_MARGIN", {3: 0.01, 4: 0.01, 8: 0.01}), \
            lowrank_setting("TOL_FACTOR", {**lowrank.TOL_FACTOR, 3: 4.0}), \
            lowrank_setting("NF8_STOP", nf8_stop):
        yield


@contextmanager
def loop_options(**fields):
    """Ablation: other defaults for fields of the loop's options (``lowrank._Opts``)."""
    saved = lowrank._Opts
    lowrank._Opts = functools.partial(saved, **fields)
    try:
        yield
    finally:
        lowrank._Opts = saved


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
            rows, _, c = run_bitalloc(mats[name], cfgs, seed=seed)
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
    # name -> (decompose_many kwargs, what it shows[, a context manager patching the library])
    "bitalloc (default)": ({}, "everything on"),
    "packing quantizer": ({}, "the loop calls quantize(...).dequantize() (bit packing) instead "
                              "of the packing-free quantize_dequantize", packing_quantizer),
    "tensor quantizer": ({}, "the loop's quantizer and error run in tensor code instead of the "
                             "compiled kernels (bit-identical values)", tensor_code),
    "no repair": ({"repair": False}, "no repair pass (NF3-NF8 configs that end above a "
                                     "coarser-scaled config are not solved again)"),
    "NF2 cold, fine first": ({}, "NF2 from the most precise scales down, each config from a cold "
                                 "start (before session 6; now from the coarsest up, warm)",
                             nf2_cold_fine_first),
    "previous tolerances": ({}, "tol x {NF3/NF4: 2, NF8: 0.3} and 3 steps of patience for NF8 "
                                "(the defaults of session 2; now {NF3: 2, NF4/NF8: 4})", previous_tolerances),
    "previous stopping rule": ({}, "halve the step after any rise and give up below 0.2; one "
                                   "tolerance and patience for all code widths", previous_stopping),
    "previous NF8 steps": ({}, "NF8 steps over-relaxed by 1.5 (not 2.5) with tol x 2 (not 4)",
                           previous_nf8_steps),
    "previous NF3/NF4 momentum": ({}, "momentum 0.3 for NF3 and NF4 (before session 9; now 0.4 "
                                      "and 0.5)", previous_nf34_momentum),
    "previous coarse NF8": ({}, "NF8 with 2-4 bit scales retreats to plain steps after a rise "
                                "and stops after 2 steps without progress, and NF8 configs of "
                                "every scale width are repaired (before session 10; now no "
                                "retreat and 3 steps for 2-4 bit scales, repairs of 3-4 bit "
                                "scales only)",
                            previous_coarse_nf8),
    "one NF2 leader start": ({}, "each NF2 group's leader from one cold start (before session "
                                 "11; now three, the lowest kept)",
                             functools.partial(lowrank_setting, "LEADER_STARTS", {})),
    "session 10 repairs and stopping": ({}, "repairs on any coarser config 1% lower, NF3 tol x 4, "
                                            "2 steps of patience for NF8 with 3-4 bit scales "
                                            "(session 10; now repairs on a coarser config 5% "
                                            "(NF3/NF4) or 10% (NF8) lower, NF3 tol x 2, 3 steps "
                                            "for NF8 with 2-4 bit scales; NF2 leaders keep their "
                                            "three starts here)",
                                        session10_loop),
    "randomized first step": ({}, "the first step of a cold start is a randomized sketch of W (2 "
                                  "power iterations, as LQ-LoRA's) instead of the shared exact SVD, "
                                  "and the second warm-starts from it",
                              functools.partial(loop_options, exact_cold=False)),
    "no minimum cold steps": ({}, "a cold start may stop after 3 steps (before: at least 6)",
                              functools.partial(loop_options, cold_min_steps=0)),
    "no stopping window": ({}, "stop when the best fell < tol over 2 steps, even after a fast "
                               "descent over the 4 before", functools.partial(loop_options, window=0.0)),
    "oversampled subspace": ({"oversample": 8}, "k = r + 8 columns in every subspace pass and "
                                                "sketch (the default before; now k = r)"),
    "Householder QR": ({}, "the subspace pass orthonormalizes with a Householder QR instead of a "
                           "Cholesky factor of the Gram matrix", householder_qr),
    "float32 step target": ({}, "the warm step's target formed as one float32 matrix and its "
                                "two subspace products in float32 (before session 8; now the "
                                "low-rank terms as factors and W - L - Q through bfloat16 products, "
                                "on matrices of 2^18+ entries: here q_proj only)", float32_step_target),
    "cheap stop on": ({"cheap_stop": True}, "the factor-movement check before each quantize "
                                            "(never fired here; costs a float64 Gram product)"),
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a few configs and two matrices (development)")
    ap.add_argument("--layers", default="0,1", help="comma-separated layer indices (default 0,1: 14 matrices)")
    ap.add_argument("--ref-every", type=int, default=7,
                    help="run the reference on every N-th config (default 7: coprime to the 2 scale "
                         "dtypes and 3 scale groups, so every setting is represented)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see results.md)")
    ap.add_argument("--no-ablations", action="store_true")
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
    lowrank._keep_freed_memory()  # what decompose_many does anyway; now, so the reference runs with it too
    if args.quant_micro_json:  # child process of the micro-benchmark
        mats, _ = load_matrices([0])
        space = config_space("lqlora", ranks=(64,))
        q = next(v for k, v in mats.items() if k.endswith(ABLATION_MATRICES[1]))
        print(json.dumps({"quant": quant_micro(mats, space[::23]), "decompose_many_q_proj_cpu_s": malloc_ab(q, space)}))
        return 0
    out = Path(args.out)
    if args.render_only:
        (out / "results.md").write_text(render_md(_read_results(out, "--render-only")))
        return 0
    if args.skip_main:
        result = _read_results(out, "--skip-main")
        # replaced, not merged: timings from older code or another default space would mislead
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
    if not on_cpu:  # kernels, cuBLAS/cuSOLVER handles: not in the first matrix's time
        w = next(iter(mats.values()))
        decompose_many(w, cfgs[:2])
        lqlora_reference(w, cfgs[0], max_iters=2)
    started = time.perf_counter()
    if args.quick:
        cfgs = cfgs[::12]
        mats = {k: v for k, v in mats.items() if k.endswith(ABLATION_MATRICES)}
    ref_idx = list(range(0, len(cfgs), args.ref_every))
    ref_cfgs = [cfgs[i] for i in ref_idx]
    log.info("%d matrices, %d configs, reference on %d", len(mats), len(cfgs), len(ref_cfgs))
    first_layer = f"model.layers.{layers[0]}."

    noise_seeds = args.noise_seeds
    per_matrix, all_ratios, all_unstored, all_best = {}, [], [], []
    tot = {"ours_wall": 0.0, "ours_cpu": 0.0, "ref_wall": 0.0, "ref_cpu": 0.0, "floor_cpu": 0.0}
    ablations: dict[str, dict] = {}
    for name, W in mats.items():
        if args.time_limit is not None and time.perf_counter() - started > args.time_limit:
            log.warning("--time-limit %.0f s reached: %d of %d matrices done", args.time_limit,
                        len(per_matrix), len(mats))
            break
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
        if noise_seeds and name.startswith(first_layer):
            per_matrix[name]["reference_other_seeds"] = {
                str(seed): [row["error"] for row in run_reference(W, ref_cfgs, seed)[0]] for seed in noise_seeds
            }
        tot["ours_wall"] += wall
        tot["ours_cpu"] += cpu
        tot["ref_wall"] += ref_wall * scale
        tot["ref_cpu"] += ref_cpu * scale
        log.info("%s: bitalloc %.1fs cpu, reference %.1fs cpu (extrapolated %.1fs), %.1fx; %s",
                 short, cpu, ref_cpu, ref_cpu * scale, ref_cpu * scale / cpu, summary(rs))
        if not args.no_ablations and name.endswith(ABLATION_MATRICES) and name.startswith(first_layer):
            for label, (kw, what, *patch) in ABLATIONS.items():
                patch = patch[0] if patch else None
                if label == "bitalloc (default)":
                    rows, w, c = ours, wall, cpu
                    n = len(cfgs)
                elif kw.get("share") is False:  # no sharing: each config alone, on the ref subset
                    rows, w, c = run_bitalloc(W, ref_cfgs, patch, **kw)
                    n = len(ref_cfgs)
                else:
                    rows, w, c = run_bitalloc(W, cfgs, patch, **kw)
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
        for name, pm in per_matrix.items()
        if name.endswith(ABLATION_MATRICES) and name.startswith(first_layer)
    }
    load_end = os.getloadavg()
    micro_cfgs = cfgs[::23]
    first = {k: v for k, v in mats.items() if k.startswith(first_layer)}
    micro = {"configs": [c.name for c in micro_cfgs], "tuned_malloc": quant_micro(first, micro_cfgs)} if on_cpu else {}
    if not args.quick and on_cpu:
        q = next(v for k, v in first.items() if k.endswith(ABLATION_MATRICES[1]))
        micro["decompose_many_q_proj_cpu_s_tuned_malloc"] = malloc_ab(q, cfgs)
    if on_cpu:  # the micro-benchmark measures the CPU quantizer
        try:
            env = dict(os.environ, BITALLOC_MALLOC_DEFAULTS="1")
            cmd = [sys.executable, str(Path(__file__).resolve()), "--quant-micro-json", "--threads", str(args.threads)]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            child = json.loads(res.stdout.strip().splitlines()[-1])
            micro["glibc_default_malloc"] = child["quant"]
            micro["decompose_many_q_proj_cpu_s_glibc_default_malloc"] = child["decompose_many_q_proj_cpu_s"]
        except (subprocess.CalledProcessError, ValueError, IndexError) as exc:
            log.warning("micro-benchmark child failed: %s", exc)
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
        "reference_noise": reference_noise(per_matrix, noise_seeds),
        "bitalloc_noise": bitalloc_noise(mats, per_matrix, cfgs, args.bitalloc_seeds),
        "ablations": ablation_rows,
        "quantizer_micro_benchmark": micro,
        "per_matrix": per_matrix,
    }
    if args.full_model:
        result["full_model"] = run_full_models(args.full_model, args.threads)
    _write_results(out, result)
    return 0


def parse_full_spec(spec: str) -> tuple[str, str, str, str | None]:
    """``SPACE[@EVERY][:ranks=R][:jobs=J]`` -> ``(space, every, ranks, jobs)``; ranks default 64."""
    head, *opts = spec.split(":")
    space, _, every = head.partition("@")
    options = dict(o.split("=", 1) for o in opts)
    unknown = set(options) - {"ranks", "jobs"}
    if unknown:
        raise SystemExit(f"--full-model {spec}: unknown option(s) {sorted(unknown)} (ranks=, jobs=)")
    return space, every, options.get("ranks", "64"), options.get("jobs")


def run_full_models(specs: list[str], threads: int) -> dict:
    """Time ``bitalloc profile --no-fisher --space S --ranks R [--jobs J]`` of the built-in model per spec."""
    from bitalloc.models import find_targets, load_model

    model, _ = load_model(None)
    names = [n for n, _ in find_targets(model)]
    layers = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    out = {}
    for spec in specs:
        space, every, ranks, jobs = parse_full_spec(spec)
        cmd = [str(Path(sys.executable).with_name("bitalloc")), "profile", "--no-fisher", "--space", space,
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
  on the CPU through the same compiled kernels),
  and runs in the same process with the same malloc setting and torch thread count, so the
  speedup is that of the algorithm, not of the quantizer.
- **bitalloc** (`decompose_many`): per (bits, block) group a leader solved cold (the most
  precise scales; for NF2 the coarsest, from three cold starts with other sketches, the lowest
  kept); every fp16/fp32 twin reuses its twin's factors (one
  quantize); other configs start from the nearest solved config (NF2: the nearest coarser
  one), except 2-bit scales of NF3-NF8, which start cold; every cold start shares one first
  step, the exact SVD of W (computed once per matrix), and its second step draws a fresh
  sketch with 2 power iterations; over-relaxed steps with momentum for 3-8 bits (1.5 with
  momentum 0.4 for NF3 and 0.5 for NF4; NF8 2.5 with 0.3), retreating to plain alternation
  (never below) after a rise, except NF8 with 2-4 bit scales, which keeps its steps; plain
  steps that rise go on; one subspace pass per later step
  reusing the last subspace (k = r columns, orthonormalized through a Cholesky factor of
  their Gram matrix), its small SVD through a float64 Gram eigendecomposition; Q quantized
  against the stored (bf16) factors with the packing-free quantizer (on the CPU, compiled
  numba kernels: NF2-NF4 levels by vector compare-and-blend against the midpoints, NF8 by a
  lookup table of the level below, the level above and the midpoint per bin, the level
  picked by index arithmetic, not a branch; no integer codes) and packed only when
  `Decomposition.q` is read; best iterate; stop when the best fell by less than tol x {NF2:
  1, NF3: 2, NF4/NF8: 4} (tol = 1e-2) over 2 steps (3 for NF8 with 2-4 bit scales) and by
  less than 3 times that over twice as many, a cold start after at least 6 steps; then, for
  NF3, NF4 and NF8 with 3-4 bit scales, a repair pass: a config that ended above a config
  with coarser scales (fewer scale bits or larger scale groups) by more than 5% (NF3, NF4) or
  10% (NF8) is solved again from that config's factors, and the lower result kept.
- glibc returns freed multi-MB blocks to the OS by default, so each temporary of the loop
  page-faults in again; bitalloc raises the trim threshold (`lowrank._keep_freed_memory`, off
  with `BITALLOC_MALLOC_DEFAULTS=1`). The micro-benchmark table shows what that buys.
- The machine is shared with other jobs (see the load averages): CPU time of this process is
  the steadier number; torch runs 1 thread (`--threads`) so that both methods see the same
  setup. The full-model profiles run the CLI in a child process with `OMP_NUM_THREADS` set to
  the same thread count (on this shared 2-core machine a second thread mostly contends).
"""


def _goals(r: dict) -> list[str]:
    """Where the measurements stand against issue 6's goals (computed, not typed in)."""
    t, e = r["totals"], r["error_ratio_vs_reference"]
    # on the CPU, process CPU time (steadier on a shared machine); on a GPU, wall time
    key, other = ("speedup_cpu", "speedup_wall") if _device(r) == "cpu" else ("speedup_wall", "speedup_cpu")
    unit, other_unit = ("CPU" if k == "speedup_cpu" else "wall" for k in (key, other))
    lines = [
        "## Against the goals (issue 6)",
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
    """The device both methods ran on, as the results name it ("cpu" before it was recorded)."""
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
        *(f"- note (added after the run): {n}" for n in r.get("notes_added", [])),
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
    if r["ablations"]:
        lines += [
            "",
            "## What each trick buys (k_proj + q_proj of the first layer, errors on the reference subset)",
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
    micro = r.get("quantizer_micro_benchmark")
    if micro:
        lines += [
            "",
            "## Quantizer micro-benchmark (ms per call, best of 3, over "
            f"{len(micro['configs'])} configs of the space)",
            "",
            "| shape | previous: bucketize codes, pack, unpack | lookup-table codes, pack, unpack | "
            "quantize_dequantize through integer codes, tensor code | quantize_dequantize, levels "
            "from the lookup table, tensor code (before) | quantize_dequantize, compiled kernels | "
            "the same five, glibc malloc defaults |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        default = micro.get("glibc_default_malloc", {})
        for shape, row in micro["tuned_malloc"].items():
            d = default.get(shape, {})
            keys = ("bucketize_quantize_dequantize_ms", "quantize_dequantize_ms", "codes_fast_path_ms",
                    "tensor_fast_path_ms", "fast_path_ms")
            dd = " / ".join(f"{d.get(k, float('nan')):.2f}" for k in keys)
            cells = " | ".join(f"{row[k]:.2f}" if k in row else "n/a" for k in keys)
            lines.append(f"| {shape} | {cells} | {dd} |")
        if {"decompose_many_q_proj_cpu_s_glibc_default_malloc", "decompose_many_q_proj_cpu_s_tuned_malloc"} <= set(micro):
            lines += ["", "The whole loop, `decompose_many` on q_proj of the first layer with all configs: "
                      f"{micro['decompose_many_q_proj_cpu_s_tuned_malloc']:.1f} s CPU with bitalloc's malloc "
                      f"setting, {micro['decompose_many_q_proj_cpu_s_glibc_default_malloc']:.1f} s with glibc's "
                      "defaults (child process). In isolation (the table) glibc adapts its thresholds; in the loop, "
                      "with temporaries of several sizes alive at once, freed blocks go back to the OS."]
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
            lines[-2:-2] = [f"Rerun after the main run with `{r['full_model_command']}`; each row ended at "
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


if __name__ == "__main__":
    raise SystemExit(main())
