"""Input checks shared by every backend: shapes, availability, budgets, ties, options.

Every problem found here raises :class:`ValueError` with a message that says what is
wrong and, where it helps, which matrix indices are affected.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

#: Backends known to :func:`bitalloc.solvers.solve`.
BACKENDS = ("highs", "pulp-highs", "pulp-cbc", "lagrange")

#: Relative slack on the budget, so that a budget computed as total_bits / params is feasible.
BUDGET_RTOL = 1e-12


@dataclass(frozen=True)
class CheckedInputs:
    """Validated arrays: unavailable entries are NaN in both ``error`` and ``bits``."""

    error: np.ndarray  # (M, C) float64
    bits: np.ndarray  # (M, C) float64
    available: np.ndarray  # (M, C) bool
    numel: np.ndarray  # (M,) float64
    ties: tuple[tuple[int, ...], ...]
    names: tuple[str, ...] | None

    @property
    def n_matrices(self) -> int:
        """Rows of the arrays."""
        return self.error.shape[0]

    @property
    def n_configs(self) -> int:
        """Columns of the arrays."""
        return self.error.shape[1]

    def label(self, m: int) -> str:
        """``3`` or ``3 ('model.layers.0.mlp.up_proj')`` for messages."""
        return f"{m} ({self.names[m]!r})" if self.names is not None else str(m)


def short_list(items: Sequence[Any], limit: int = 10) -> str:
    """``[a, b, c]``, cut after ``limit`` items with the total, for messages."""
    shown = ", ".join(str(i) for i in items[:limit])
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return f"[{shown}{more}]"


def _as_matrix(value: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a numeric M x C array: {exc}") from exc
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (matrices x configs), got shape {arr.shape}")
    return arr


def check_arrays(
    error: Any,
    storage_bits: Any,
    numel: Any,
    ties: Sequence[Sequence[int]] | None = None,
    names: Sequence[str] | None = None,
) -> CheckedInputs:
    """Validate the solver inputs and return them as float64 arrays with NaN holes."""
    err = _as_matrix(error, "error")
    bits = _as_matrix(storage_bits, "storage_bits")
    if err.shape != bits.shape:
        raise ValueError(
            f"error and storage_bits must have the same shape, got {err.shape} and {bits.shape}"
        )
    n_mat, n_cfg = err.shape
    if n_mat == 0:
        raise ValueError("there are no matrices to allocate (error has 0 rows)")
    if n_cfg == 0:
        raise ValueError("there are no configs to choose from (error has 0 columns)")
    try:
        counts = np.asarray(numel, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"numel must be a 1-D array of parameter counts: {exc}") from exc
    if counts.ndim != 1 or counts.shape[0] != n_mat:
        raise ValueError(
            f"numel must be a 1-D array with one entry per matrix ({n_mat}), "
            f"got shape {counts.shape}"
        )
    bad = np.flatnonzero(~np.isfinite(counts) | (counts <= 0))
    if bad.size:
        raise ValueError(
            f"numel must be positive and finite; matrices {short_list(bad.tolist())} "
            f"have {short_list(counts[bad].tolist())}"
        )
    if names is not None:
        names = tuple(str(n) for n in names)
        if len(names) != n_mat:
            raise ValueError(f"got {len(names)} matrix names for {n_mat} matrices")

    available = np.isfinite(err) & np.isfinite(bits)
    empty = np.flatnonzero(~available.any(axis=1))
    if empty.size:
        label = [f"{m} ({names[m]!r})" if names else str(m) for m in empty.tolist()]
        raise ValueError(
            f"matrices {short_list(label)} have no available config "
            "(every error/storage_bits entry in their rows is NaN or inf)"
        )
    neg_err = available & (err < 0)
    if neg_err.any():
        rows = np.flatnonzero(neg_err.any(axis=1)).tolist()
        raise ValueError(
            f"errors must be >= 0 (they are squared norms); matrices {short_list(rows)} "
            "have negative entries"
        )
    neg_bits = available & (bits < 0)
    if neg_bits.any():
        rows = np.flatnonzero(neg_bits.any(axis=1)).tolist()
        raise ValueError(f"storage_bits must be >= 0; matrices {short_list(rows)} have negative entries")

    err = np.where(available, err, np.nan)
    bits = np.where(available, bits, np.nan)
    return CheckedInputs(err, bits, available, counts, check_ties(ties, n_mat), names)


def check_ties(ties: Sequence[Sequence[int]] | None, n_matrices: int) -> tuple[tuple[int, ...], ...]:
    """Normalize tie groups: sorted, de-duplicated members, in range, not overlapping."""
    if ties is None:
        return ()
    if isinstance(ties, (str, bytes)) or not isinstance(ties, Sequence):
        raise ValueError("ties must be a list of lists of matrix indices, e.g. [[0, 1, 2], [4, 5]]")
    owner: dict[int, int] = {}
    out: list[tuple[int, ...]] = []
    for t, group in enumerate(ties):
        if isinstance(group, (str, bytes)) or not isinstance(group, (Sequence, np.ndarray)):
            raise ValueError(f"tie {t} must be a list of matrix indices, got {group!r}")
        members: set[int] = set()
        for idx in group:
            if isinstance(idx, (bool, np.bool_)) or not isinstance(idx, numbers.Integral):
                raise ValueError(f"tie {t} holds {idx!r}; matrix indices must be ints")
            idx = int(idx)
            if not 0 <= idx < n_matrices:
                raise ValueError(
                    f"tie {t} names matrix {idx}, out of range for {n_matrices} matrices"
                )
            if idx in owner and owner[idx] != t:
                raise ValueError(
                    f"matrix {idx} is in two ties ({owner[idx]} and {t}); "
                    "ties must not overlap (merge them into one)"
                )
            owner[idx] = t
            members.add(idx)
        if len(members) > 1:
            out.append(tuple(sorted(members)))
    return tuple(out)


def check_budget(budget: Any) -> float:
    """A budget must be a positive finite number of bits per parameter."""
    if isinstance(budget, (bool, np.bool_)) or not isinstance(budget, numbers.Real):
        raise ValueError(f"budget must be a number of bits per parameter, got {budget!r}")
    value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget must be a positive finite number of bits per parameter, got {budget!r}")
    return value


def check_backend(backend: Any) -> str:
    """The backend name must be one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; choose one of {list(BACKENDS)}")
    return str(backend)


def check_options(time_limit: Any, mip_gap: Any) -> tuple[float | None, float]:
    """``time_limit``: None or seconds > 0; ``mip_gap``: a relative gap in [0, 1)."""
    if time_limit is not None:
        if isinstance(time_limit, bool) or not isinstance(time_limit, numbers.Real):
            raise ValueError(f"time_limit must be a number of seconds or None, got {time_limit!r}")
        time_limit = float(time_limit)
        if not math.isfinite(time_limit) or time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds or None, got {time_limit!r}")
    if isinstance(mip_gap, bool) or not isinstance(mip_gap, numbers.Real):
        raise ValueError(f"mip_gap must be a relative gap like 0.001, got {mip_gap!r}")
    mip_gap = float(mip_gap)
    if not (0.0 <= mip_gap < 1.0):
        raise ValueError(f"mip_gap must be in [0, 1), got {mip_gap!r}")
    return time_limit, mip_gap


def capacity_bits(budget: float, total_params: float) -> float:
    """The most bits an allocation may store for ``budget`` bits/param."""
    return budget * total_params * (1.0 + BUDGET_RTOL)
