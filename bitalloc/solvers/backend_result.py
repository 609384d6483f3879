"""What an exact backend returns for one core MIP."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


@dataclass
class BackendResult:
    """Raw answer of a backend.

    ``pick``: one candidate index per group, or None when no allocation was found.
    ``status``: "optimal" (proven within the requested gap), "time_limit" or "failed".
    ``bound``: the solver's proven lower bound on the model, in error units (NaN if none).
    """

    pick: np.ndarray | None
    status: str
    bound: float = math.nan
    seconds: float = 0.0
    detail: str = ""
    columns: int = 0  # the most columns a MIP held
    rounds: int = 0  # MIPs solved
    timings: dict[str, float] = field(default_factory=dict)
