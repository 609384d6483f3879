"""The ablations of bench/profile_speed.py, as data: each is a LoopPolicy.

Each knob of :class:`bitalloc.lowrank.LoopPolicy` that the benchmark's matrices exercise is
set to its neutral value (off, zero, or what the loop does without it) while every other
field keeps the default of ``decompose_many`` (:data:`bitalloc.lowrank.MANY_CONFIGS`).
``alone`` ablations solve every config alone (``share=False``) and so run on the reference's
config subset only.
"""

from __future__ import annotations

from dataclasses import dataclass

from bitalloc.lowrank import MANY_CONFIGS, LoopPolicy

BASELINE = MANY_CONFIGS


@dataclass(frozen=True)
class Ablation:
    """One variant of the default policy: ``knob`` is the LoopPolicy field it changes."""

    name: str
    knob: str
    what: str
    policy: LoopPolicy
    alone: bool = False


def _off(name: str, knob: str, what: str, **changes) -> Ablation:
    return Ablation(name, knob, what, BASELINE.replace(**changes))


ABLATIONS: list[Ablation] = [
    # the rank-r step
    _off("oversampled subspace", "oversample", "k = r + 8 columns in every subspace pass and sketch "
         "(decompose's default) instead of k = r", oversample=8),
    _off("no power iterations", "power_iters", "fresh sketches without power iterations", power_iters=0),
    _off("fresh sketch every step", "warm_subspace", "every step draws a fresh randomized sketch "
         "instead of one subspace pass from the last subspace", warm_subspace=False),
    _off("Householder QR", "cholesky_qr", "the warm pass orthonormalizes with a Householder QR "
         "instead of a Cholesky factor of the Gram matrix", cholesky_qr=False),
    _off("float32 step target", "split_target", "the warm step's target as one float32 matrix "
         "instead of split (dense part through bfloat16 products)", split_target=False),
    # cold starts
    _off("randomized first step", "exact_cold", "a cold start's first step is a randomized sketch "
         "of W instead of the shared exact SVD, and the second warm-starts from it", exact_cold=False),
    # stepping and stopping
    _off("plain steps", "step", "plain alternation for every code width (no over-relaxation or "
         "momentum)", step={}),
    _off("coarse NF8 retreats", "coarse_nf8_scale_bits", "NF8 with 2-4 bit scales retreats to "
         "shorter steps after a rise, like every other code", coarse_nf8_scale_bits=frozenset()),
    _off("coarse NF8 patience 2", "coarse_nf8_patience", "NF8 with 2-4 bit scales stops after 2 "
         "steps without progress instead of 3", coarse_nf8_patience=2),
    _off("one tolerance", "tol_factor", "the same tolerance (tol) for every code width",
         tol_factor={}),
    _off("no stopping window", "stop_window", "stop when the best fell < tol over 2 steps, even "
         "after a fast descent over the 4 before", stop_window=0.0),
    _off("iteration cap 100", "max_iters", "at most 100 steps per run (LQ-LoRA's cap) instead of "
         "50", max_iters=100),
    # many configs of one matrix
    _off("twins iterate", "twin_iters", "fp16/fp32 twins take up to 50 steps from their "
         "sibling's factors instead of none", twin_iters=50),
    _off("fine first for NF2", "coarse_first", "NF2 from the most precise scales down, like the "
         "other codes", coarse_first=frozenset()),
    _off("2-bit scales warm", "cold_scale_bits", "2-bit scales of NF3-NF8 start from the nearest "
         "solved config instead of cold", cold_scale_bits=frozenset()),
    _off("no repair", "repair_margin", "no repair pass", repair_margin={}),
    _off("repair on any lower", "repair_margin", "repairs whenever a coarser config ended lower "
         "(margin 0) instead of 5% (NF3/NF4) or 10% (NF8) lower",
         repair_margin={3: 0.0, 4: 0.0, 8: 0.0}),
    _off("repair every NF8", "repair_nf8_scale_bits", "the repair pass re-solves NF8 configs of "
         "every scale width instead of 3-4 bit scales only",
         repair_nf8_scale_bits=frozenset({2, 3, 4, 8})),
    Ablation("no sharing", "share", "each config alone from a cold start",
             BASELINE.replace(share=False), alone=True),
]

#: Knobs the benchmark's matrices do not exercise (named so the report can say so).
NOT_EXERCISED = {
    "exact_svd_max_size": "no matrix here has 128 x 128 entries or fewer",
    "cold_exact_max_side": "every matrix here has a smaller side of at most 576, below 1024",
    "cold_power_iters": "used only above cold_exact_max_side",
    "fisher_floor": "the benchmark runs without a Fisher estimate",
    "keep_freed_memory": "process-wide: measured in a child process (see the micro-benchmark)",
}


def by_name() -> dict[str, Ablation]:
    """The ablations by name (names are unique)."""
    out = {a.name: a for a in ABLATIONS}
    assert len(out) == len(ABLATIONS)
    return out
