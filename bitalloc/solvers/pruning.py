"""Lossless dominance pruning of configs within a matrix (or a tied group)."""

from __future__ import annotations

import numpy as np


def prune_dominated(error: np.ndarray, bits: np.ndarray, *, order: np.ndarray | None = None) -> np.ndarray:
    """Mask of the configs that survive dominance pruning, row by row.

    A config is dropped when another config of the same row has no more bits and no more
    error (and is strictly better in one, or is an exact duplicate with a lower column
    index). Unavailable entries (NaN/inf in either array) are never kept. The survivors
    of a row, ordered by bits, have strictly decreasing error. Accepts 1-D (one row) or
    2-D arrays; returns a boolean array of the same shape. ``order``: :func:`row_order` of the
    2-D arrays (unavailable entries as inf), when the caller has it already.
    """
    err = np.asarray(error, dtype=np.float64)
    b = np.asarray(bits, dtype=np.float64)
    if err.shape != b.shape:
        raise ValueError(f"error and bits must have the same shape, got {err.shape} and {b.shape}")
    if err.ndim == 1:
        return prune_dominated(err[None, :], b[None, :])[0]
    if err.ndim != 2:
        raise ValueError(f"prune_dominated expects 1-D or 2-D arrays, got shape {err.shape}")
    n_rows, n_cols = err.shape
    if err.size == 0:
        return np.zeros(err.shape, dtype=bool)
    ok = np.isfinite(err) & np.isfinite(b)
    e = np.where(ok, err, np.inf)
    bb = np.where(ok, b, np.inf)
    if order is None:
        order = row_order(e, bb)
    e_sorted = np.take_along_axis(e, order, axis=1)
    # Least error among the cheaper-or-equal configs that precede each entry in its row.
    running = np.minimum.accumulate(e_sorted, axis=1)
    before = np.empty_like(running)
    before[:, 0] = np.inf
    before[:, 1:] = running[:, :-1]
    keep = np.zeros(err.shape, dtype=bool)
    np.put_along_axis(keep, order, e_sorted < before, axis=1)
    return keep & ok


def row_order(error: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """Per row, the column order by (bits, error, column); NaN/inf entries (give them inf) sort last."""
    cols = np.broadcast_to(np.arange(error.shape[1]), error.shape)
    return np.lexsort((cols, error, bits), axis=-1)
