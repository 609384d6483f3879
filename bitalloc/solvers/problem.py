"""The solver's internal problem: tied groups as super-matrices, pruned candidate lists.

A tie makes its members behave as one matrix whose error and bits for config ``c`` are the
sums over the members; a config unavailable for one member is unavailable for the group.
Untied matrices are groups of one. Dominance pruning runs on the groups, which keeps it
lossless. Candidates are stored flat (CSR): group ``g`` owns ``start[g]:start[g+1]``,
ordered by bits, then error, then column.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .pruning import prune_dominated, row_order
from .validation import CheckedInputs, short_list

log = logging.getLogger(__name__)


@dataclass
class CandidateProblem:
    """Groups and their surviving candidate configs, ready for any backend."""

    inputs: CheckedInputs
    members: list[np.ndarray]  # matrix indices of each group
    matrix_group: np.ndarray  # (M,) group of each matrix
    start: np.ndarray  # (G+1,) CSR offsets into the candidate arrays
    cand_group: np.ndarray  # (K,)
    cand_col: np.ndarray  # (K,) column into the original config axis
    cand_error: np.ndarray  # (K,) group error of the candidate
    cand_bits: np.ndarray  # (K,) group bits of the candidate
    n_available: int  # group-level available candidates before pruning
    cache: dict = field(default_factory=dict, repr=False)

    @property
    def n_groups(self) -> int:
        """Groups: one per untied matrix or tie."""
        return len(self.members)

    @property
    def n_candidates(self) -> int:
        """Candidates left after pruning, over all groups."""
        return int(self.cand_col.shape[0])

    @cached_property
    def total_params(self) -> float:
        """Parameters of every matrix."""
        return float(self.inputs.numel.sum())

    @cached_property
    def cheapest_pick(self) -> np.ndarray:
        """Per group, the candidate with the fewest bits (least error among equals)."""
        return self.start[:-1].copy()

    @cached_property
    def least_error_pick(self) -> np.ndarray:
        """Per group, the candidate with the least error (fewest bits among equals)."""
        gmin = np.minimum.reduceat(self.cand_error, self.start[:-1])
        hits = np.flatnonzero(self.cand_error == gmin[self.cand_group])
        _, first = np.unique(self.cand_group[hits], return_index=True)
        return hits[first]

    def pick_bits(self, pick: np.ndarray) -> float:
        """Total bits of a per-group pick (exact for integer bit counts)."""
        return float(self.cand_bits[pick].sum())

    def pick_error(self, pick: np.ndarray) -> float:
        """Total error of a per-group pick, summed over groups."""
        return float(self.cand_error[pick].sum())

    def choice_from_pick(self, pick: np.ndarray) -> np.ndarray:
        """Matrix-level column choice from a per-group candidate pick."""
        return self.cand_col[pick][self.matrix_group].astype(np.int64)

    def pick_from_choice(self, choice: np.ndarray) -> np.ndarray | None:
        """Per-group candidate pick for a matrix-level choice, or None if one is not a candidate."""
        choice = np.asarray(choice)
        if choice.shape != (self.inputs.n_matrices,):
            return None
        first_member = np.array([m[0] for m in self.members])
        cols = choice[first_member]
        pick = np.empty(self.n_groups, dtype=np.int64)
        for g, col in enumerate(cols.tolist()):
            lo, hi = self.start[g], self.start[g + 1]
            hit = np.flatnonzero(self.cand_col[lo:hi] == col)
            if hit.size == 0:
                return None
            pick[g] = lo + hit[0]
        return pick

    def pick_from_indicator(self, x: np.ndarray) -> np.ndarray:
        """Per-group pick from a 0/1 solution vector over candidates (largest entry wins)."""
        x = np.asarray(x, dtype=np.float64)
        pick = np.empty(self.n_groups, dtype=np.int64)
        # reduceat-based argmax: sort key (group, -x, position) and take the first per group.
        order = np.lexsort((np.arange(x.size), -x, self.cand_group))
        firsts = np.searchsorted(self.cand_group[order], np.arange(self.n_groups), side="left")
        pick[:] = order[firsts]
        return pick


def build_problem(inputs: CheckedInputs, *, prune: bool = True) -> CandidateProblem:
    """Form tied groups, sum their rows, prune dominated configs, flatten the candidates."""
    n_mat, n_cfg = inputs.error.shape
    matrix_group = np.full(n_mat, -1, dtype=np.int64)
    for t, tie in enumerate(inputs.ties):
        matrix_group[list(tie)] = t
    # Groups ordered by their first member: re-number ties and singletons together.
    key = np.where(matrix_group >= 0, -1 - matrix_group, np.arange(n_mat))
    _, first, inverse = np.unique(key, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    matrix_group = rank[inverse.reshape(-1)]
    n_groups = int(first.size)
    members = [np.flatnonzero(matrix_group == g) for g in range(n_groups)] if inputs.ties else [
        np.array([m]) for m in range(n_mat)
    ]

    if inputs.ties:
        gerr = np.zeros((n_groups, n_cfg))
        gbits = np.zeros((n_groups, n_cfg))
        np.add.at(gerr, matrix_group, inputs.error)  # NaN in one member -> NaN for the group
        np.add.at(gbits, matrix_group, inputs.bits)
    else:
        gerr, gbits = inputs.error, inputs.bits
    available = np.isfinite(gerr) & np.isfinite(gbits)
    empty = np.flatnonzero(~available.any(axis=1))
    if empty.size:
        tied = [[inputs.label(int(m)) for m in members[g]] for g in empty.tolist()]
        raise ValueError(
            f"tied matrices {short_list(tied, 5)} share no available config: a config "
            "unavailable for one member of a tie is unavailable for the whole tie"
        )
    n_available = int(available.sum())
    # Candidates group by group, each group's by (bits, error, column).
    order = row_order(np.where(available, gerr, np.inf), np.where(available, gbits, np.inf))
    mask = prune_dominated(gerr, gbits, order=order) if prune else available
    g_idx, pos = np.nonzero(np.take_along_axis(mask, order, axis=1))
    c_idx = order[g_idx, pos]
    cand_error = gerr[g_idx, c_idx]
    cand_bits = gbits[g_idx, c_idx]
    start = np.zeros(n_groups + 1, dtype=np.int64)
    np.cumsum(np.bincount(g_idx, minlength=n_groups), out=start[1:])
    log.info(
        "%d matrices in %d groups: %d of %d available candidates survive %s",
        n_mat, n_groups, len(c_idx), n_available,
        "dominance pruning" if prune else "(pruning off)",
    )
    return CandidateProblem(
        inputs=inputs,
        members=members,
        matrix_group=matrix_group,
        start=start,
        cand_group=g_idx.astype(np.int64),
        cand_col=c_idx.astype(np.int64),
        cand_error=cand_error,
        cand_bits=cand_bits,
        n_available=n_available,
    )
