"""The budget grammar: ``START:STOP:STEP`` (end included when on the grid) or ``a,b,c``."""

from __future__ import annotations

import math
import re

_EXPECTED = (
    "expected START:STOP:STEP in bits/param (e.g. '2.25:4.5:0.05', STOP included when it "
    "lands on the grid) or a comma list (e.g. '2.5,3,3.5')"
)
_NUMBER = r"\s*[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?\s*"
_MAX_BUDGETS = 100_000


def parse_budgets(text: str) -> list[float]:
    """Parse a budget list: ``"2.25:4.5:0.05"`` -> [2.25, 2.3, ..., 4.5]; ``"2.5,3"`` -> [2.5, 3.0]."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"invalid budgets {text!r}: {_EXPECTED}")
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) != 3 or not all(re.fullmatch(_NUMBER, p) for p in parts):
            raise ValueError(f"invalid budgets {text!r}: {_EXPECTED}")
        start, stop, step = (float(p) for p in parts)
        if step <= 0:
            raise ValueError(f"invalid budgets {text!r}: STEP must be > 0; {_EXPECTED}")
        if stop < start:
            raise ValueError(f"invalid budgets {text!r}: STOP must be >= START; {_EXPECTED}")
        span = (stop - start) / step
        count = int(math.floor(span + 1e-9)) + 1
        if count > _MAX_BUDGETS:
            raise ValueError(f"invalid budgets {text!r}: {count} budgets is too many (max {_MAX_BUDGETS})")
        values = [round(start + i * step, 12) for i in range(count)]
    else:
        parts = text.split(",")
        if not all(re.fullmatch(_NUMBER, p) for p in parts):
            raise ValueError(f"invalid budgets {text!r}: {_EXPECTED}")
        values = [float(p) for p in parts]
    bad = [v for v in values if not (v > 0 and math.isfinite(v))]
    if bad:
        raise ValueError(f"invalid budgets {text!r}: budgets must be positive bits/param, got {bad}")
    return values
