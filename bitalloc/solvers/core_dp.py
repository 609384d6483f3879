"""Bounded dynamic programming over the core: the incumbent finder for the exact backends.

Starting from the hull greedy allocation (every group on a vertex of its hull), groups
whose alternatives have small reduced cost are processed one by one, largest matrices
first. A state is a whole allocation (unprocessed groups at their reference config); it
keeps (bits, error) and is dropped when another state has no more bits and no more error
(dominance), or when its error plus the LP bound of the unprocessed groups at its
leftover bits cannot beat the best allocation found (bounding). Without truncation this
is an exact algorithm for the multiple-choice knapsack; with ``max_states`` hit it keeps
the states with the best bounds and becomes a heuristic (``exact`` is then False).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from .lagrange import LagrangeHull, LagrangeResult
from .problem import CandidateProblem

log = logging.getLogger(__name__)


@dataclass
class CoreSearchResult:
    """Best allocation found, whether the search was exhaustive, and its size."""

    pick: np.ndarray
    objective: float
    exact: bool
    peak_states: int
    groups: int


class _SuffixBound:
    """LP bound of the unprocessed groups moving away from the reference along their hulls.

    ``phi(s)``: the least error change of the unprocessed groups that changes their bits by
    at most ``s`` (s < 0: bits must be freed). Convex, piecewise linear; evaluated for many
    ``s`` at once.
    """

    def __init__(self, hull: LagrangeHull, ref: np.ndarray) -> None:
        problem = hull.problem
        bits, err = problem.cand_bits, problem.cand_error
        verts, vstart = hull.vert_idx, hull.vert_start
        counts = np.diff(vstart)
        vgroup = np.repeat(np.arange(problem.n_groups), counts)
        p = hull.hull_pos[ref].copy()
        off = p < 0
        if off.any():  # reference off the hull: bound from the hull vertex just below it
            below = (bits[verts] <= bits[ref][vgroup]).astype(np.int64)
            p_off = np.add.reduceat(below, vstart[:-1]) - 1 if verts.size else np.zeros(problem.n_groups, np.int64)
            p[off] = np.maximum(p_off[off], 0)
        # Hull segments t -> t + 1 of every group: upgrades at positions >= p, downgrades below p.
        pos = np.arange(verts.size) - vstart[vgroup]
        seg = np.flatnonzero(pos < counts[vgroup] - 1)
        lo_v, hi_v, g_s, t_s = verts[seg], verts[seg + 1], vgroup[seg], pos[seg]
        up = t_s >= p[g_s]
        up_g, up_b, up_e = g_s[up], bits[hi_v[up]] - bits[lo_v[up]], err[hi_v[up]] - err[lo_v[up]]
        dn = np.flatnonzero(~up)
        dn = dn[np.lexsort((-t_s[dn], g_s[dn]))]  # group by group, from the reference down
        dn_g, dn_b, dn_e = g_s[dn], bits[hi_v[dn]] - bits[lo_v[dn]], err[lo_v[dn]] - err[hi_v[dn]]
        # Upgrades: most error saved per bit first. Downgrades: least error added per bit freed first.
        up_b, up_e = np.asarray(up_b, float), np.asarray(up_e, float)
        dn_b, dn_e = np.asarray(dn_b, float), np.asarray(dn_e, float)
        o = np.lexsort((np.arange(up_b.size), up_e / np.maximum(up_b, 1e-300)))
        self.up_g, self.up_b, self.up_e = np.asarray(up_g, np.int64)[o], up_b[o], up_e[o]
        o = np.lexsort((np.arange(dn_b.size), dn_e / np.maximum(dn_b, 1e-300)))
        self.dn_g, self.dn_b, self.dn_e = np.asarray(dn_g, np.int64)[o], dn_b[o], dn_e[o]
        self.done = np.zeros(problem.n_groups, dtype=bool)
        self._refresh()

    def mark_processed(self, g: int) -> None:
        """Leave group ``g`` out of the bound from now on."""
        self.done[g] = True
        self._refresh()

    def _refresh(self) -> None:
        keep = ~self.done[self.up_g]
        self.ub, self.ue = self.up_b[keep], self.up_e[keep]
        self.cub, self.cue = np.cumsum(self.ub), np.cumsum(self.ue)
        keep = ~self.done[self.dn_g]
        self.db, self.de = self.dn_b[keep], self.dn_e[keep]
        self.cdb, self.cde = np.cumsum(self.db), np.cumsum(self.de)

    def phi(self, s: np.ndarray) -> np.ndarray:
        """``phi`` at every entry of ``s`` (see the class docstring)."""
        out = np.zeros_like(s)
        pos = s > 0
        if pos.any() and self.ub.size:
            out[pos] = _piecewise(self.cub, self.cue, self.ub, self.ue, s[pos])
        neg = s < 0
        if neg.any():
            need = -s[neg]
            if self.db.size:
                val = _piecewise(self.cdb, self.cde, self.db, self.de, need)
                val[need > self.cdb[-1]] = np.inf
            else:
                val = np.full(need.shape, np.inf)
            out[neg] = val
        return out


def _piecewise(cum_b: np.ndarray, cum_e: np.ndarray, b: np.ndarray, e: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Error change of taking segments in order until ``s`` bits, the last one fractionally."""
    n = np.searchsorted(cum_b, s, side="right")
    full_e = np.where(n > 0, cum_e[np.maximum(n - 1, 0)], 0.0)
    full_b = np.where(n > 0, cum_b[np.maximum(n - 1, 0)], 0.0)
    nxt = np.minimum(n, b.size - 1)
    frac = np.where(n < b.size, (s - full_b) / b[nxt], 0.0)
    return full_e + np.clip(frac, 0.0, 1.0) * np.where(n < b.size, e[nxt], 0.0)


def core_search(
    problem: CandidateProblem,
    hull: LagrangeHull,
    capacity: float,
    lagrange: LagrangeResult,
    reduced_cost: np.ndarray,
    bound: float,
    incumbent: np.ndarray,
    *,
    cutoff: float = np.inf,
    max_states: int = 20000,
    deadline: float | None = None,
) -> CoreSearchResult:
    """Best allocation within ``capacity`` bits among those cheaper than ``cutoff``.

    ``reduced_cost``/``bound`` come from the Lagrangian at the optimal price: an allocation
    using a candidate costs at least ``bound`` plus its reduced cost, so only candidates
    with reduced cost below ``min(U, cutoff) - bound`` are tried (U: the best error found).
    If ``exact`` comes back True, every allocation cheaper than ``min(U, cutoff)`` was seen.
    ``deadline`` (a ``time.perf_counter`` value) stops the search early, inexact.
    """
    bits, err = problem.cand_bits, problem.cand_error
    best_pick = incumbent.copy()
    best_err = problem.pick_error(best_pick)
    if deadline is not None and time.perf_counter() > deadline:  # before the O(candidates) setup
        return CoreSearchResult(pick=best_pick, objective=best_err, exact=False, peak_states=0, groups=0)
    ref = lagrange.greedy_pick
    tau = best_err - bound
    alt = reduced_cost <= tau * (1 + 1e-9) + 1e-12 * abs(best_err)
    alt[ref] = False
    groups = np.unique(problem.cand_group[alt])
    min_rc = np.full(problem.n_groups, np.inf)
    np.minimum.at(min_rc, problem.cand_group[alt], reduced_cost[alt])
    tol = 1e-12 * (abs(best_err) + 1.0)
    # Coarse to fine: groups of the largest matrices first, the small ones then fine-tune
    # the fill (measured: several times fewer states than ordering by reduced cost).
    size = np.maximum.reduceat(bits, problem.start[:-1])
    groups = groups[np.lexsort((groups, -size[groups]))]
    suffix = _SuffixBound(hull, ref)

    state_b = np.array([problem.pick_bits(ref)])
    state_e = np.array([problem.pick_error(ref)])
    parents: list[np.ndarray] = []
    choices: list[np.ndarray] = []
    best_at: tuple[int, int] | None = None
    exact, peak = True, 1
    for g in groups.tolist():
        # Allocations using a candidate with reduced cost above best - bound cannot improve;
        # a group whose alternatives all cost more is skipped.
        tau = min(best_err, cutoff) - bound
        if min_rc[g] > tau * (1 + 1e-9) + tol:
            continue
        if deadline is not None and time.perf_counter() > deadline:
            exact = False
            break
        step = len(parents)
        lo, hi = problem.start[g], problem.start[g + 1]
        r = int(ref[g])
        ok = alt[lo:hi] & (reduced_cost[lo:hi] <= tau * (1 + 1e-9) + tol)
        cands = np.concatenate([[r], lo + np.flatnonzero(ok)])
        d_b = bits[cands] - bits[r]
        d_e = err[cands] - err[r]
        suffix.mark_processed(g)
        # New states, candidate-major: each candidate shifts the bits-sorted states (a sorted run).
        n_states = state_b.size
        nb = (d_b[:, None] + state_b[None, :]).ravel()
        ne = (d_e[:, None] + state_e[None, :]).ravel()
        best_flat = -1
        feasible = nb <= capacity
        if feasible.any():
            i = int(np.argmin(np.where(feasible, ne, np.inf)))
            if ne[i] < best_err:
                best_err, best_flat = float(ne[i]), i
        # Bounding: error so far plus the LP bound of the unprocessed groups.
        lower = ne + suffix.phi(capacity - nb)
        keep = lower < min(best_err, cutoff) - tol
        if best_flat >= 0:
            keep[best_flat] = True  # keep the path of the best allocation
        idx = np.flatnonzero(keep)
        # Dominance: by bits ascending (a stable merge of the runs), keep strictly falling error.
        order = idx[np.argsort(nb[idx], kind="stable")]
        e_sorted = ne[order]
        undominated = np.ones(order.size, dtype=bool)
        undominated[1:] = e_sorted[1:] < np.minimum.accumulate(e_sorted)[:-1]
        order = order[undominated | (order == best_flat)]
        if order.size > max_states:
            exact = False
            beam_cut = np.partition(lower[order], max_states - 1)[max_states - 1]
            order = order[(lower[order] <= beam_cut) | (order == best_flat)]
        if best_flat >= 0:
            best_at = (step, int(np.flatnonzero(order == best_flat)[0]))
        state_b, state_e = nb[order], ne[order]
        parents.append((order % n_states).astype(np.int32))
        choices.append(cands[order // n_states].astype(np.int64))
        peak = max(peak, order.size)
        if order.size == 0:
            break
    if best_at is not None:
        pick = ref.copy()
        step, i = best_at
        while step >= 0:
            c = int(choices[step][i])
            pick[problem.cand_group[c]] = c
            i = int(parents[step][i])
            step -= 1
        best_pick = pick
    log.debug("core search: %d groups, peak %d states, exact %s", len(groups), peak, exact)
    return CoreSearchResult(
        pick=best_pick, objective=problem.pick_error(best_pick), exact=exact, peak_states=peak, groups=len(groups)
    )


@dataclass
class SearchOutcome:
    """Best pick found, whether it is proven optimal, and a proven lower bound on the optimum."""

    pick: np.ndarray
    proven: bool
    floor: float


def search_optimum(
    problem: CandidateProblem,
    hull: LagrangeHull,
    capacity: float,
    lagrange: LagrangeResult,
    reduced_cost: np.ndarray,
    bound: float,
    incumbent: np.ndarray,
    *,
    max_states: int = 20000,
    beam_states: int = 1000,
    first_fraction: float = 1 / 8,
    growth: float = 1.5,
    deadline: float | None = None,
) -> SearchOutcome:
    """Core searches with a growing cutoff, while they stay exhaustive.

    Round i explores every allocation cheaper than ``bound + tau_i``: when the best one
    found is below that, it is optimal; when none is, the optimum is at least
    ``bound + tau_i`` (``floor``). ``tau`` starts at a fraction of the incumbent's gap and
    grows until it covers the incumbent. The search stops at the first round that hits
    ``max_states`` or ``deadline`` (its best allocation is still kept). A first, narrow
    pass (at most ``beam_states`` states, the best-bounded) improves the incumbent, so
    that the exhaustive rounds start from a small gap.
    """
    best = core_search(
        problem, hull, capacity, lagrange, reduced_cost, bound, incumbent,
        max_states=beam_states, deadline=deadline,
    ).pick
    best_err = problem.pick_error(best)
    floor = bound
    tau = max(best_err - bound, 0.0) * first_fraction
    while True:
        full = bound + tau >= best_err
        cutoff = np.inf if full else bound + tau
        result = core_search(
            problem, hull, capacity, lagrange, reduced_cost, bound, best,
            cutoff=cutoff, max_states=max_states, deadline=deadline,
        )
        if result.objective < best_err:
            best, best_err = result.pick, result.objective
        if not result.exact:
            return SearchOutcome(best, False, floor)
        if best_err <= cutoff:
            return SearchOutcome(best, True, best_err)
        floor = max(floor, cutoff)
        tau *= growth
