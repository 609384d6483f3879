"""Lagrangian relaxation on the lower convex hulls of (bits, error) per group.

Relaxing the budget row with a price λ ≥ 0 (error per bit) splits the problem: each group
takes the candidate minimizing ``error + λ·bits``, always a vertex of its lower convex
hull. Sorting every hull segment of every group by its price gives, in one pass, all
breakpoints of the relaxation: the whole-model hull. At a budget, taking segments in
that order until the next one no longer fits gives a feasible allocation; taking that
segment fractionally gives the LP relaxation optimum, which equals the Lagrangian dual and
bounds the integer optimum from below. A cheap fill-in step then spends leftover bits on
the single-group upgrades that cut the most error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .problem import CandidateProblem, build_problem
from .validation import check_arrays

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LagrangeResult:
    """A feasible pick at one capacity and the Lagrangian (LP) lower bound."""

    pick: np.ndarray  # feasible, after the fill-in step
    bound: float
    price: float  # λ at the break (error per bit); 0 when every segment fits
    greedy_pick: np.ndarray  # the hull greedy before fill-in: every group on a hull vertex


class LagrangeHull:
    """Hull segments of every group, ordered by price; solves any capacity in O(K)."""

    def __init__(self, problem: CandidateProblem) -> None:
        self.problem = problem
        bits, err = problem.cand_bits, problem.cand_error
        vertices, counts = lower_hulls(bits, err, problem.start)
        vert_start = np.zeros(problem.n_groups + 1, dtype=np.int64)
        np.cumsum(counts, out=vert_start[1:])
        #: Hull vertices of group g: ``vert_idx[vert_start[g]:vert_start[g+1]]``, cheapest first.
        self.vert_start = vert_start
        self.vert_idx = vertices
        #: Position of each candidate in its group's hull, -1 off the hull.
        self.hull_pos = np.full(problem.n_candidates, -1, dtype=np.int64)
        self.hull_pos[self.vert_idx] = np.arange(len(vertices)) - vert_start[problem.cand_group[self.vert_idx]]
        last = np.zeros(len(vertices), dtype=bool)
        last[vert_start[1:][counts > 0] - 1] = True
        seg_from = vertices[~last]
        seg_to = vertices[np.flatnonzero(~last) + 1]
        d_bits = bits[seg_to] - bits[seg_from]
        d_err = err[seg_to] - err[seg_from]
        price = -d_err / d_bits
        group = problem.cand_group[seg_from]
        # Highest price first; within a group the hull order already has falling prices. The
        # segments come group by group in hull order, so a stable sort on the price alone
        # orders ties by group, then position (a lexsort on all three keys, at a fraction of its cost).
        order = np.argsort(-price, kind="stable")
        self.seg_from = seg_from[order]
        self.seg_to = seg_to[order]
        self.seg_group = group[order]
        self.d_bits = d_bits[order]
        self.d_err = d_err[order]
        self.price = price[order]
        self.cum_bits = np.cumsum(self.d_bits)
        self.cum_err = np.cumsum(self.d_err)
        base = problem.cheapest_pick
        self.base_pick = base
        self.base_bits = problem.pick_bits(base)
        self.base_error = problem.pick_error(base)

    @property
    def n_segments(self) -> int:
        """Segments of the hull, over all groups."""
        return int(self.seg_from.shape[0])

    def points(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The whole-model hull: total bits, total error and price λ at each vertex.

        Vertex 0 is the cheapest allocation (price inf); vertex k follows the k-th upgrade,
        reached when the price of a bit falls to ``price[k]``.
        """
        bits = np.concatenate([[self.base_bits], self.base_bits + self.cum_bits])
        err = np.concatenate([[self.base_error], self.base_error + self.cum_err])
        price = np.concatenate([[np.inf], self.price])
        return bits, err, price

    def solve(self, capacity: float, *, fill: bool = True) -> LagrangeResult:
        """Greedy along the hull at ``capacity`` bits, the LP bound, and an optional fill-in."""
        slack = capacity - self.base_bits
        if slack < 0:
            raise ValueError("capacity below the cheapest allocation")
        n_take = int(np.searchsorted(self.cum_bits, slack, side="right"))
        pick = self.base_pick.copy()
        if n_take:
            np.maximum.at(pick, self.seg_group[:n_take], self.seg_to[:n_take])
        taken_bits = float(self.cum_bits[n_take - 1]) if n_take else 0.0
        taken_err = float(self.cum_err[n_take - 1]) if n_take else 0.0
        bound = self.base_error + taken_err
        price = 0.0
        if n_take < self.n_segments:
            frac = (slack - taken_bits) / self.d_bits[n_take]
            bound += max(0.0, min(1.0, frac)) * float(self.d_err[n_take])
            price = float(self.price[n_take])
        greedy = pick
        if fill:
            pick = fill_in(self.problem, pick, capacity)
        return LagrangeResult(pick=pick, bound=bound, price=price, greedy_pick=greedy)


def lower_hulls(bits: np.ndarray, err: np.ndarray, start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The falling lower convex hull of every group at once: vertex indices (group by group,
    cheapest first) and the vertex count of each group.

    Candidates of group g are ``start[g]:start[g+1]``, sorted by bits, then error. The same
    monotone chain as :func:`_lower_hull_decreasing`, run in lockstep over the groups: step k
    looks at the k-th candidate of every group, so the Python loop has as many steps as the
    largest group has candidates.
    """
    n_groups = start.size - 1
    sizes = np.diff(start)
    width = int(sizes.max()) if n_groups else 0
    stack = np.zeros((n_groups, max(width, 1)), dtype=np.int64)
    top = np.zeros(n_groups, dtype=np.int64)
    best = np.full(n_groups, np.inf)
    for k in range(width):
        gs = np.flatnonzero(sizes > k)
        cand = start[gs] + k
        falls = err[cand] < best[gs]  # not below every cheaper point: never on the falling hull
        gs, cand = gs[falls], cand[falls]
        best[gs] = err[cand]
        live, live_cand = gs, cand
        while live.size:
            two = top[live] >= 2
            live, live_cand = live[two], live_cand[two]
            i = stack[live, top[live] - 2]
            j = stack[live, top[live] - 1]
            e, b = err[live_cand], bits[live_cand]
            # Drop j unless it lies strictly below the chord i -> k.
            cross = (bits[j] - bits[i]) * (e - err[i]) - (err[j] - err[i]) * (b - bits[i])
            pop = cross <= 0
            live, live_cand = live[pop], live_cand[pop]
            top[live] -= 1
        has = top[gs] >= 1
        same = np.zeros(gs.size, dtype=bool)
        same[has] = bits[stack[gs[has], top[gs[has]] - 1]] == bits[cand[has]]
        top[gs[same]] -= 1  # same bits, more error (cannot happen after sorting, kept for safety)
        stack[gs, top[gs]] = cand
        top[gs] += 1
    keep = np.arange(stack.shape[1])[None, :] < top[:, None]
    return stack[keep], top


def _lower_hull_decreasing(bits: np.ndarray, err: np.ndarray, lo: int, hi: int) -> list[int]:
    """Indices of the lower convex hull of one group, from the cheapest point to the least error.

    Points are sorted by bits, then error; only the falling part of the hull is kept, with
    collinear middle points dropped so that prices fall strictly.
    """
    hull: list[int] = []
    best = np.inf
    for k in range(lo, hi):
        e = err[k]
        if e >= best:
            continue  # not below every cheaper point: never on the falling hull
        best = e
        b = bits[k]
        while len(hull) >= 2:
            i, j = hull[-2], hull[-1]
            # Drop j unless it lies strictly below the chord i -> k.
            cross = (bits[j] - bits[i]) * (e - err[i]) - (err[j] - err[i]) * (b - bits[i])
            if cross <= 0:
                hull.pop()
            else:
                break
        if hull and bits[hull[-1]] == b:
            hull.pop()  # same bits, more error (cannot happen after sorting, kept for safety)
        hull.append(k)
    return hull


def fill_in(problem: CandidateProblem, pick: np.ndarray, capacity: float, max_moves: int | None = None) -> np.ndarray:
    """Spend leftover bits: repeatedly take the single-group change that cuts the most error."""
    pick = pick.copy()
    bits, err, grp = problem.cand_bits, problem.cand_error, problem.cand_group
    used = problem.pick_bits(pick)
    max_moves = max_moves if max_moves is not None else 4 * problem.n_groups + 16
    for _ in range(max_moves):
        slack = capacity - used
        if slack <= 0:
            break
        d_bits = bits - bits[pick][grp]
        d_err = err - err[pick][grp]
        ok = (d_bits <= slack) & (d_err < 0)
        if not ok.any():
            break
        k = int(np.argmin(np.where(ok, d_err, np.inf)))
        pick[grp[k]] = k
        used = problem.pick_bits(pick)
    return pick


def lagrange_hull(
    error: Any,
    storage_bits: Any,
    numel: Any,
    ties: Sequence[Sequence[int]] | None = None,
    *,
    prune: bool = True,
    matrix_names: Sequence[str] | None = None,
) -> "pd.DataFrame":
    """The whole-model lower convex hull of (bits/param, Σ error), as a DataFrame.

    Columns: ``bits_per_param``, ``objective`` (Σ error at the vertex, an achievable
    allocation), ``lambda`` (the price, error per bit/param, at which the allocation moves
    to this vertex; inf for the cheapest one). Between vertices the hull is the Lagrangian
    (LP) lower bound on the optimum at any budget.
    """
    import pandas as pd

    problem = build_problem(check_arrays(error, storage_bits, numel, ties, matrix_names), prune=prune)
    hull = LagrangeHull(problem)
    bits, err, price = hull.points()
    params = problem.total_params
    return pd.DataFrame({"bits_per_param": bits / params, "objective": err, "lambda": price * params})

