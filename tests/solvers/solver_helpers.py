"""Random small problems and a brute-force reference for the solver tests."""

from __future__ import annotations

import itertools

import numpy as np


def random_problem(
    seed: int,
    n_matrices: int = 6,
    n_configs: int = 5,
    holes: float = 0.0,
    integer_bits: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(error, storage_bits, numel) with errors falling in bits, plus noise; NaN holes if asked."""
    rng = np.random.default_rng(seed)
    numel = rng.integers(50, 500, n_matrices).astype(float)
    bpp = rng.uniform(2.0, 8.0, (n_matrices, n_configs))
    bits = bpp * numel[:, None]
    if integer_bits:
        bits = np.round(bits)
    error = numel[:, None] * rng.uniform(0.2, 3.0, n_matrices)[:, None] * 2.0 ** (-bpp)
    error *= rng.uniform(0.7, 1.4, error.shape)
    if holes:
        mask = rng.random(error.shape) < holes
        mask[np.arange(n_matrices), rng.integers(0, n_configs, n_matrices)] = False  # one config each
        error[mask] = np.nan
    return error, bits, numel


def groups_of(n_matrices: int, ties) -> list[list[int]]:
    """Ties plus singletons, in order of first member."""
    ties = [sorted(t) for t in (ties or [])]
    tied = {m for t in ties for m in t}
    groups = ties + [[m] for m in range(n_matrices) if m not in tied]
    return sorted(groups, key=lambda g: g[0])


def brute_force(error, bits, numel, budget, ties=None) -> tuple[float, np.ndarray | None]:
    """Least Σ error over every allocation within the budget (and the ties); (inf, None) if none."""
    n_matrices, n_configs = error.shape
    groups = groups_of(n_matrices, ties)
    g_err = np.array([error[g].sum(axis=0) for g in groups])
    g_bits = np.array([bits[g].sum(axis=0) for g in groups])
    combos = np.array(list(itertools.product(range(n_configs), repeat=len(groups))))
    rows = np.arange(len(groups))
    tot_err = g_err[rows, combos].sum(axis=1)
    tot_bits = g_bits[rows, combos].sum(axis=1)
    ok = np.isfinite(tot_err) & np.isfinite(tot_bits) & (tot_bits <= budget * numel.sum() * (1 + 1e-12))
    if not ok.any():
        return np.inf, None
    best = int(np.flatnonzero(ok)[np.argmin(tot_err[ok])])
    choice = np.empty(n_matrices, dtype=int)
    for g, col in zip(groups, combos[best]):
        choice[g] = col
    return float(tot_err[best]), choice


def feasible_budget(error, bits, numel, seed: int, ties=None) -> float:
    """A budget between the cheapest and the least-error allocation (so the knapsack binds)."""
    rng = np.random.default_rng(seed + 1000)
    n_matrices = error.shape[0]
    groups = groups_of(n_matrices, ties)
    ok = np.isfinite(error) & np.isfinite(bits)
    lo = hi = 0.0
    for g in groups:
        avail = ok[g].all(axis=0)
        gb = bits[g].sum(axis=0)
        ge = error[g].sum(axis=0)
        lo += gb[avail].min()
        cand = np.flatnonzero(avail)
        hi += gb[cand[np.argmin(ge[cand])]]
    lo, hi = lo / numel.sum(), hi / numel.sum()
    return float(lo + rng.uniform(0.15, 0.85) * max(hi - lo, 0.0)) if hi > lo else float(hi + 0.1)
