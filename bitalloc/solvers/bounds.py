"""Per-matrix floors and ceilings on bits/param, applied by masking configs out.

Grammar: ``REGEX=BITS``, e.g. ``lm_head|down_proj=3``: matrices whose name matches the
regex (``re.search``) get at least (``--min-bits``) or at most (``--max-bits``) 3 bits per
parameter, counted as the budget counts them.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

_EXPECTED = "expected REGEX=BITS, e.g. 'lm_head|down_proj=3'"

Bound = tuple[str, float]


def parse_bounds(specs: str | Sequence[str | Bound] | None) -> list[Bound]:
    """Parse ``"REGEX=BITS"`` specs (one string or a list; (regex, bits) pairs pass through)."""
    if specs is None:
        return []
    if isinstance(specs, str):
        specs = [specs]
    out: list[Bound] = []
    for spec in specs:
        if isinstance(spec, tuple) and len(spec) == 2:
            pattern, value = spec
            text = f"{pattern}={value}"
        elif isinstance(spec, str):
            text = spec
            pattern, sep, value = spec.rpartition("=")
            if not sep:
                raise ValueError(f"invalid bits bound {spec!r}: {_EXPECTED}")
        else:
            raise ValueError(f"invalid bits bound {spec!r}: {_EXPECTED}")
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"invalid bits bound {text!r}: the regex is empty; {_EXPECTED}")
        try:
            bits = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid bits bound {text!r}: {value!r} is not a number; {_EXPECTED}") from None
        if not math.isfinite(bits) or bits <= 0:
            raise ValueError(f"invalid bits bound {text!r}: BITS must be a positive number; {_EXPECTED}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid bits bound {text!r}: bad regex ({exc}); {_EXPECTED}") from exc
        out.append((pattern, bits))
    return out


def apply_bit_bounds(
    bits_per_param: np.ndarray,
    names: Sequence[str],
    min_bits: Sequence[Bound] = (),
    max_bits: Sequence[Bound] = (),
    *,
    rtol: float = 1e-9,
) -> np.ndarray:
    """Mask (M x C) of the configs allowed by the floors/ceilings; NaN entries stay disallowed.

    A matrix matched by several floors takes the highest, by several ceilings the lowest.
    A pattern matching no matrix, or a matrix left with no allowed config, is a ValueError.
    """
    bpp = np.asarray(bits_per_param, dtype=np.float64)
    names = [str(n) for n in names]
    if bpp.ndim != 2 or bpp.shape[0] != len(names):
        raise ValueError(f"bits_per_param must be (matrices x configs) for {len(names)} names, got {bpp.shape}")
    floor = np.full(len(names), -np.inf)
    ceiling = np.full(len(names), np.inf)
    for bounds, target, combine in ((min_bits, floor, np.maximum), (max_bits, ceiling, np.minimum)):
        for pattern, value in bounds:
            regex = re.compile(pattern)
            hits = np.array([regex.search(n) is not None for n in names], dtype=bool)
            if not hits.any():
                kind = "--min-bits" if target is floor else "--max-bits"
                raise ValueError(f"{kind} pattern {pattern!r} matches no matrix name")
            target[hits] = combine(target[hits], value)
    available = np.isfinite(bpp)
    allowed = available & (bpp >= floor[:, None] * (1 - rtol)) & (bpp <= ceiling[:, None] * (1 + rtol))
    empty = np.flatnonzero(available.any(axis=1) & ~allowed.any(axis=1))
    if empty.size:
        m = int(empty[0])
        lo, hi = np.nanmin(bpp[m]), np.nanmax(bpp[m])
        others = f" (and {empty.size - 1} more)" if empty.size > 1 else ""
        raise ValueError(
            f"matrix {names[m]!r}{others} has no config within its bits bounds "
            f"[{floor[m]:g}, {ceiling[m]:g}] bits/param; its configs span {lo:.4f}..{hi:.4f}"
        )
    return allowed
