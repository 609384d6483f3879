"""``LoopPolicy``: every tuning knob of the decomposition, in one frozen dataclass.

Each field says what it does and why; what each one buys is measured by
``bench/profile_speed.py`` (its ablations are policies) and recorded in
``reports/profile_speed/``. Two named instances hold the defaults: :data:`ONE_CONFIG` for
:func:`bitalloc.lowrank.decompose` and :data:`MANY_CONFIGS` for
:func:`bitalloc.lowrank.decompose_many`, which differ in ``tol`` and ``oversample`` only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from types import MappingProxyType
from typing import Any, Mapping

__all__ = ["LoopPolicy", "ONE_CONFIG", "MANY_CONFIGS"]

def _frozen_map(m: Mapping[Any, Any]) -> Mapping[Any, Any]:
    return MappingProxyType(dict(m))


@dataclass(frozen=True)
class LoopPolicy:
    """How the alternating loop steps, stops, and shares work between configs.

    Mappings keyed by code bits (``cfg.bits``) fall back to the neutral value for a width they
    do not name. ``replace(policy, field=value)`` (``dataclasses.replace``) gives a variant.
    """

    # --- the rank-r step ------------------------------------------------------------------
    #: Extra columns of every subspace pass and sketch beyond the rank. The loop carries its
    #: subspace from step to step, so it converges over the steps without them.
    oversample: int = 8
    #: Power iterations of a fresh randomized sketch (the second step of a cold start).
    power_iters: int = 2
    #: Each later step is one subspace-iteration pass from the previous step's right subspace
    #: (the target changes little between steps) instead of a fresh sketch.
    warm_subspace: bool = True
    #: The warm pass orthonormalizes through a Cholesky factor of its Gram matrix, cheaper than
    #: a Householder QR (which it falls back to for an ill-conditioned range).
    cholesky_qr: bool = True
    #: The warm step keeps its target split: low-rank terms as float32 factors and the dense
    #: ``W - L - Q`` through bfloat16 products with float32 sums (native bf16 hardware only),
    #: so only the step's correction is rounded.
    split_target: bool = True
    #: An exact SVD replaces the subspace pass on matrices of at most this many entries (a
    #: sketch would cost as much), as it does when the sketch covers half the smaller side.
    exact_svd_max_size: int = 128 * 128

    # --- cold starts ------------------------------------------------------------------------
    #: The first step of a cold start (from ``Q = 0``) is the exact top-r SVD of W, shared by
    #: every config of the matrix, and the second step sketches afresh: accurate early steps
    #: lead the NF2 loop to lower errors than randomized ones.
    exact_cold: bool = True
    #: Above this smaller side that top-r part comes from a subspace iteration with 2r
    #: columns and :attr:`cold_power_iters` passes instead: an SVD of a large matrix costs
    #: more than the whole loop.
    cold_exact_max_side: int = 1024
    cold_power_iters: int = 4

    # --- stepping -----------------------------------------------------------------------------
    #: (over-relaxation, momentum) of the step by code bits: the factors fit
    #: ``L + relax (W - L - Q) + momentum (L - L_prev)``. Longer steps with momentum take
    #: fewer iterations to lower errors for 3-8 bit codes; NF2's rugged landscape does worse
    #: with them. Unnamed widths: plain alternation (1.0, 0.0).
    step: Mapping[int, tuple[float, float]] = field(
        default_factory=lambda: {2: (1.0, 0.0), 3: (1.5, 0.4), 4: (1.5, 0.5), 8: (2.5, 0.3)})
    #: NF8 configs with these scale bits keep their long steps after a rise (their error keeps
    #: falling for many steps, and retreating to plain alternation crawls) and wait
    #: :attr:`coarse_nf8_patience` steps without progress; other over-relaxed steps that rise
    #: are undone and retried shorter, never shorter than plain alternation.
    coarse_nf8_scale_bits: frozenset[int] = frozenset({2, 3, 4})
    coarse_nf8_patience: int = 3

    # --- stopping -----------------------------------------------------------------------------
    #: Hard cap on the steps of one run of the loop (LQ-LoRA's is 100).
    max_iters: int = 50
    #: Relative improvement of the best objective below which the loop stops ...
    tol: float = 1e-3
    #: ... times this factor by code bits: NF3/NF4/NF8 converge smoothly and end below
    #: LQ-LoRA's error early; longer NF2 runs do not help. Unnamed widths: 1.
    tol_factor: Mapping[int, float] = field(default_factory=lambda: {2: 1.0, 3: 2.0, 4: 4.0, 8: 4.0})
    #: ... over this many steps.
    patience: int = 2
    #: The loop also goes on while the best fell by more than this x tol over twice as many
    #: steps: a bump in a fast descent is not convergence (0: no such check).
    stop_window: float = 3.0

    # --- many configs of one matrix (decompose_many) ------------------------------------------
    #: Share work between configs (leaders, warm starts, twins, repairs); False solves every
    #: config alone from a cold start, as ``decompose`` does.
    share: bool = True
    #: Steps of an fp16/fp32 twin from its sibling's factors (0: just quantize against them:
    #: their Q are all but identical, iterating bought nothing).
    twin_iters: int = 0
    #: Code bits whose configs are solved from the coarsest scales up, each from the nearest
    #: coarser config (NF2); the others go from the most precise scales down.
    coarse_first: frozenset[int] = frozenset({2})
    #: Scale bits whose configs (outside :attr:`coarse_first`) start cold instead of from a
    #: non-twin: coarse scales clip, and another config's factors fit another clipping.
    cold_scale_bits: frozenset[int] = frozenset({2})
    #: The repair pass re-solves a config of these code bits from a config with coarser scales
    #: that ended this much (relative) lower: finer scales should not do worse. Unnamed widths
    #: are not repaired; an empty mapping turns the pass off.
    repair_margin: Mapping[int, float] = field(default_factory=lambda: {3: 0.05, 4: 0.05, 8: 0.10})
    #: NF8 configs are repaired only with these scale bits (2- and 8-bit-scale repairs cost
    #: work and did not move their errors).
    repair_nf8_scale_bits: frozenset[int] = frozenset({3, 4})

    # --- Fisher weighting and the process -------------------------------------------------------
    #: Fisher row/column weights are floored at this fraction of their largest value.
    fisher_floor: float = 1e-6
    #: On the CPU, ask glibc once per process to keep freed memory: the loop's matrix-sized
    #: temporaries otherwise go back to the OS and page-fault in again on every step.
    keep_freed_memory: bool = True

    def __post_init__(self) -> None:
        for name in ("step", "tol_factor", "repair_margin"):
            object.__setattr__(self, name, _frozen_map(getattr(self, name)))
        for name in ("coarse_nf8_scale_bits", "coarse_first", "cold_scale_bits", "repair_nf8_scale_bits"):
            object.__setattr__(self, name, frozenset(getattr(self, name)))
        ints = {"oversample": 0, "power_iters": 0, "exact_svd_max_size": 0,
                "cold_exact_max_side": 1, "cold_power_iters": 0, "coarse_nf8_patience": 1, "max_iters": 0, "patience": 1, "twin_iters": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"LoopPolicy.{name} must be an integer >= {low}, got {value!r}")
        for name in ("warm_subspace", "cholesky_qr", "split_target", "exact_cold", "share", "keep_freed_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoopPolicy.{name} must be a bool, got {getattr(self, name)!r}")
        _positive("tol", self.tol)
        _positive("fisher_floor", self.fisher_floor)
        if not (math.isfinite(self.stop_window) and self.stop_window >= 0):
            raise ValueError(f"LoopPolicy.stop_window must be >= 0, got {self.stop_window!r}")
        for bits, pair in self.step.items():
            if len(pair) != 2 or not float(pair[0]) > 0 or not float(pair[1]) >= 0:
                raise ValueError(f"LoopPolicy.step[{bits}] must be (relax > 0, momentum >= 0), got {pair!r}")
        for bits, factor in self.tol_factor.items():
            _positive(f"tol_factor[{bits}]", factor)
        for bits, margin in self.repair_margin.items():
            if not 0 <= float(margin) < 1:
                raise ValueError(f"LoopPolicy.repair_margin[{bits}] must be in [0, 1), got {margin!r}")

    # --- per-config values ----------------------------------------------------------------------
    def relax_momentum(self, bits: int) -> tuple[float, float]:
        """(over-relaxation, momentum) of the step for codes of ``bits``."""
        relax, momentum = self.step.get(bits, (1.0, 0.0))
        return float(relax), float(momentum)

    def tolerance(self, bits: int) -> float:
        """The stopping tolerance for codes of ``bits``."""
        return self.tol * self.tol_factor.get(bits, 1.0)

    def keeps_long_steps(self, bits: int, scale_bits: int) -> bool:
        """Whether a rise after an over-relaxed step is kept (no retreat to shorter steps)."""
        return bits == 8 and scale_bits in self.coarse_nf8_scale_bits

    def patience_for(self, bits: int, scale_bits: int) -> int:
        """Steps without progress before the loop stops."""
        return self.coarse_nf8_patience if self.keeps_long_steps(bits, scale_bits) else self.patience

    def repairs(self, bits: int, scale_bits: int) -> bool:
        """Whether the repair pass may re-solve a config."""
        return bits in self.repair_margin and (bits != 8 or scale_bits in self.repair_nf8_scale_bits)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (sets as sorted lists, mappings with their keys as given)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, frozenset):
                value = sorted(value)
            elif isinstance(value, Mapping):
                value = {k: list(v) if isinstance(v, tuple) else v for k, v in value.items()}
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LoopPolicy":
        """Inverse of :meth:`to_dict` (JSON's string keys are read back as code bits)."""
        kw = dict(data)
        for name in ("step", "tol_factor", "repair_margin"):
            if name in kw:
                kw[name] = {int(k): tuple(v) if isinstance(v, list) else v for k, v in kw[name].items()}
        return cls(**kw)

    def replace(self, **changes: Any) -> "LoopPolicy":
        """A copy with some fields changed."""
        return replace(self, **changes)


def _positive(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"LoopPolicy.{name} must be a finite number > 0, got {value!r}")


#: The defaults of :func:`bitalloc.lowrank.decompose` (one config, done carefully).
ONE_CONFIG = LoopPolicy()
#: The defaults of :func:`bitalloc.lowrank.decompose_many`: a looser tolerance (many
#: configs, measured against LQ-LoRA's loop) and no extra subspace columns.
MANY_CONFIGS = LoopPolicy(tol=1e-2, oversample=0)
