"""The grammars users type for the solver: budget lists, bit bounds and tie patterns.

* Budgets: ``START:STOP:STEP`` (STOP included when on the grid) or ``a,b,c``, in bits/param.
* Bounds: ``REGEX=BITS``, e.g. ``lm_head|down_proj=3``: matrices whose name matches the
  regex (``re.search``) get at least (``--min-bits``) or at most (``--max-bits``) 3 bits per
  parameter, counted as the budget counts them; configs outside are masked out.
* Ties: matrices that must share one config (fused kernels). Two matrices are tied by a
  pattern when the pattern matches both names and the names are equal once the matched part
  is removed (their "layer key"): with ``\\.[qkv]_proj$``, ``model.layers.3.self_attn.q_proj``
  and ``model.layers.3.self_attn.k_proj`` share the key ``model.layers.3.self_attn`` and are
  tied; layer 4's q/k/v form another tie.
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

# ----- budgets ---------------------------------------------------------------------------
_BUDGETS_EXPECTED = (
    "expected START:STOP:STEP in bits/param (e.g. '2.25:4.5:0.05', STOP included when it "
    "lands on the grid) or a comma list (e.g. '2.5,3,3.5')"
)
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_MAX_BUDGETS = 100_000


def parse_budgets(text: str) -> list[float]:
    """Parse a budget list: ``"2.25:4.5:0.05"`` -> [2.25, 2.3, ..., 4.5]; ``"2.5,3"`` -> [2.5, 3.0]."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid budgets {text!r}: {_BUDGETS_EXPECTED}")
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or not all(re.fullmatch(_NUMBER, p) for p in parts):
            raise ValueError(f"invalid budgets {text!r}: {_BUDGETS_EXPECTED}")
        start, stop, step = (float(p) for p in parts)
        if step <= 0:
            raise ValueError(f"invalid budgets {text!r}: STEP must be > 0; {_BUDGETS_EXPECTED}")
        if stop < start:
            raise ValueError(f"invalid budgets {text!r}: STOP must be >= START; {_BUDGETS_EXPECTED}")
        span = (stop - start) / step
        count = int(math.floor(span + 1e-9)) + 1
        if count > _MAX_BUDGETS:
            raise ValueError(f"invalid budgets {text!r}: {count} budgets is too many (max {_MAX_BUDGETS})")
        values = [round(start + i * step, 12) for i in range(count)]
    else:
        parts = text.split(",")
        if not all(re.fullmatch(_NUMBER, p) for p in parts):
            raise ValueError(f"invalid budgets {text!r}: {_BUDGETS_EXPECTED}")
        values = [float(p) for p in parts]
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"invalid budgets {text!r}: budgets must be positive bits/param, got {bad}")
    return values


# ----- bit bounds ------------------------------------------------------------------------
_BOUNDS_EXPECTED = "expected REGEX=BITS, e.g. 'lm_head|down_proj=3'"

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
                raise ValueError(f"invalid bits bound {spec!r}: {_BOUNDS_EXPECTED}")
        else:
            raise ValueError(f"invalid bits bound {spec!r}: {_BOUNDS_EXPECTED}")
        if not isinstance(pattern, str) or not pattern.strip():
            raise ValueError(f"invalid bits bound {text!r}: the regex is empty; {_BOUNDS_EXPECTED}")
        try:
            bits = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"invalid bits bound {text!r}: {value!r} is not a number; {_BOUNDS_EXPECTED}") from None
        if not math.isfinite(bits) or bits <= 0:
            raise ValueError(f"invalid bits bound {text!r}: BITS must be a positive number; {_BOUNDS_EXPECTED}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid bits bound {text!r}: bad regex ({exc}); {_BOUNDS_EXPECTED}") from exc
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


# ----- ties ------------------------------------------------------------------------------
#: Generic fusion patterns (no model names). Each ties, within one module, the matrices that
#: inference engines commonly fuse into one GEMM:
#:
#: * ``\.[qkv]_proj$``: q/k/v projections (LLaMA, Mistral, Qwen, Gemma, OPT, Phi, GPT-J, ...);
#: * ``\.(gate|up)_proj$``: SwiGLU gate/up (also per expert in MoE models);
#: * ``\.w[13]$``: Mixtral experts' and Meta-LLaMA's gate/up (w1, w3);
#: * ``\.attention\.w[qkv]$``: Meta-LLaMA's q/k/v (wq, wk, wv);
#: * ``\.(query|key|value)$``: BERT-style attention;
#: * ``(?<=Attention)\.[qkv]$``: T5-style attention.
#:
#: Already-fused matrices (GPT-2's ``attn.c_attn``, Falcon/NeoX ``query_key_value``,
#: Phi-3's ``qkv_proj``) need no tie. As a preset, patterns that match nothing are skipped.
FUSE_PRESET: tuple[str, ...] = (
    r"\.[qkv]_proj$",
    r"\.(gate|up)_proj$",
    r"\.w[13]$",
    r"\.attention\.w[qkv]$",
    r"\.(query|key|value)$",
    r"(?<=Attention)\.[qkv]$",
)

#: In a pattern list, this item stands for :data:`FUSE_PRESET`.
PRESET_TOKEN = "fuse"


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} pattern must be a non-empty regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {exc}") from exc


def tie_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    """Tie patterns as a tuple, each a valid regex or the preset item ``"fuse"``."""
    if patterns is None:
        return ()
    if isinstance(patterns, str):
        patterns = [patterns]
    out = tuple(patterns)
    for pattern in out:
        if pattern != PRESET_TOKEN:
            _compile(pattern, "tie")
    return out


def expand_tie_patterns(patterns: str | Sequence[str]) -> list[tuple[str, bool]]:
    """Patterns with a flag "from the preset" (preset patterns may match nothing)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if tuple(patterns) == FUSE_PRESET:
        return [(p, True) for p in FUSE_PRESET]
    out: list[tuple[str, bool]] = []
    for p in patterns:
        if p == PRESET_TOKEN:
            out.extend((q, True) for q in FUSE_PRESET)
        else:
            out.append((p, False))
    return out


def tie_groups(names: Sequence[str], patterns: str | Sequence[str]) -> list[list[int]]:
    """Indices of tied matrices: one list per (pattern, layer key) with two or more members.

    ``patterns`` is a regex or a list of them (``re.search`` on each name); the item
    ``"fuse"`` (or passing :data:`FUSE_PRESET` itself) stands for the preset. A user
    pattern that matches no name, or a name matched by two patterns, is a ValueError.
    """
    names = [str(n) for n in names]
    owner: dict[int, str] = {}
    groups: dict[tuple[int, str], list[int]] = {}
    for p_idx, (pattern, from_preset) in enumerate(expand_tie_patterns(patterns)):
        regex = _compile(pattern, "tie")
        matched = False
        for m, name in enumerate(names):
            hit = regex.search(name)
            if hit is None:
                continue
            matched = True
            if m in owner and owner[m] != pattern:
                raise ValueError(
                    f"matrix {name!r} matches two tie patterns ({owner[m]!r} and {pattern!r}); "
                    "make the patterns disjoint"
                )
            owner[m] = pattern
            key = name[: hit.start()] + "\0" + name[hit.end() :]
            groups.setdefault((p_idx, key), []).append(m)
        if not matched and not from_preset:
            raise ValueError(f"tie pattern {pattern!r} matches no matrix name")
    ties = [members for members in groups.values() if len(members) > 1]
    ties.sort(key=lambda members: members[0])
    return ties
