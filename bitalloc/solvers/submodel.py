"""The MIP handed to an exact backend: a subset ("core") of the candidates, compacted.

Groups left with a single core candidate are fixed and leave the model; for the others
each column's error and bits are shifted by the group's cheapest core values (a constant
that goes into the objective offset and the budget's right-hand side), costs are rescaled
by a power of two (exact), and the budget row is in bits per parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .problem import CandidateProblem


@dataclass
class SubModel:
    """Arrays of one core MIP; column j stands for candidate ``cand[j]`` of free group ``col_group[j]``."""

    problem: CandidateProblem
    cand: np.ndarray  # (n,) global candidate index of each column
    col_group: np.ndarray  # (n,) free-group index of each column, 0..n_free-1, sorted
    cost: np.ndarray  # (n,) scaled, shifted error
    weight: np.ndarray  # (n,) shifted bits per parameter
    rhs: float  # budget row upper bound (bits per parameter, after shifts and fixed groups)
    offset: float  # scaled constant: fixed groups' error + the shifts
    scale: float  # cost = (error - shift) * scale
    n_free: int
    fixed_pick: np.ndarray  # (G,) candidate for fixed groups, -1 for free ones

    @property
    def n_cols(self) -> int:
        """Candidate columns left in the MIP."""
        return int(self.cand.shape[0])

    def starts(self) -> np.ndarray:
        """CSR offsets of the free groups' columns."""
        out = np.zeros(self.n_free + 1, dtype=np.int64)
        np.cumsum(np.bincount(self.col_group, minlength=self.n_free), out=out[1:])
        return out

    def columns_of(self, pick: np.ndarray | None) -> np.ndarray | None:
        """0/1 column values for a per-group pick, or None if the pick leaves the core."""
        if pick is None:
            return None
        x = np.zeros(self.n_cols)
        where = {int(k): j for j, k in enumerate(self.cand.tolist())}
        for g in np.flatnonzero(self.fixed_pick < 0).tolist():
            j = where.get(int(pick[g]))
            if j is None:
                return None
            x[j] = 1.0
        return x

    def pick_from_values(self, x: np.ndarray) -> np.ndarray:
        """Per-group pick from column values (largest value per free group wins)."""
        pick = self.fixed_pick.copy()
        if self.n_cols:
            x = np.asarray(x, dtype=np.float64)
            order = np.lexsort((np.arange(x.size), -x, self.col_group))
            firsts = np.searchsorted(self.col_group[order], np.arange(self.n_free), side="left")
            chosen = self.cand[order[firsts]]
            pick[self.problem.cand_group[chosen]] = chosen
        return pick

    def to_original(self, scaled_objective: float) -> float:
        """A scaled model objective (offset included) in error units."""
        return scaled_objective / self.scale


def build_submodel(problem: CandidateProblem, core: np.ndarray, capacity: float) -> SubModel:
    """Compact MIP over the candidates in ``core`` (a boolean mask or sorted indices)."""
    core = np.asarray(core)
    idx = np.flatnonzero(core) if core.dtype == bool else np.unique(core)
    groups = problem.cand_group[idx]
    counts = np.bincount(groups, minlength=problem.n_groups)
    if (counts == 0).any():
        raise ValueError("the core must hold at least one candidate per group")
    first = np.searchsorted(groups, np.arange(problem.n_groups), side="left")
    # Within a group candidates are ordered by bits then error: the first is the cheapest.
    base_err = np.minimum.reduceat(problem.cand_error[idx], first)
    base_bits = problem.cand_bits[idx][first]
    fixed = counts == 1
    fixed_pick = np.where(fixed, idx[first], -1)
    free_mask = ~fixed[groups]
    cols = idx[free_mask]
    col_group_global = groups[free_mask]
    free_ids = np.cumsum(~fixed) - 1
    col_group = free_ids[col_group_global]
    params = problem.total_params
    shifted_err = problem.cand_error[cols] - base_err[col_group_global]
    top = float(shifted_err.max()) if cols.size else 0.0
    scale = math.ldexp(1.0, -math.frexp(top)[1]) if top > 0 and math.isfinite(top) else 1.0
    const_err = float(problem.cand_error[fixed_pick[fixed]].sum()) + float(base_err[~fixed].sum())
    const_bits = float(problem.cand_bits[fixed_pick[fixed]].sum()) + float(base_bits[~fixed].sum())
    return SubModel(
        problem=problem,
        cand=cols,
        col_group=col_group.astype(np.int64),
        cost=shifted_err * scale,
        weight=(problem.cand_bits[cols] - base_bits[col_group_global]) / params,
        rhs=(capacity - const_bits) / params,
        offset=const_err * scale,
        scale=scale,
        n_free=int((~fixed).sum()),
        fixed_pick=fixed_pick,
    )
