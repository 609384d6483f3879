"""Measured KL of whole allocations, and of one-step moves around one (the operating point).

:class:`AllocationProbe` turns ``{matrix: config name}`` into weights ``Q + L1·L2`` (each
decomposed as ``apply`` does: the same seed per matrix and the Fisher estimate when given,
kept for reuse) and measures with a :class:`~bitalloc.models.kl_probe.KLProbe`:
:meth:`AllocationProbe.kl` the whole allocation, :meth:`AllocationProbe.move_kls` the
allocation with each of some moves applied, each measured from its first block around the
allocation's own hidden states.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank import decompose
from bitalloc.models.kl_probe import KLProbe
from bitalloc.models.targets import target_weight

log = logging.getLogger(__name__)


class AllocationProbe:
    """KL to the original model of allocations of ``targets`` (config names per target).

    ``tokens``: the windows measured on; ``fisher``: ``{name: F}`` for Fisher-weighted
    decompositions (as the profile had); ``seed``: the profile's seed (each matrix's
    decomposition is seeded by it and the matrix's index among ``targets``, as ``apply`` does).
    """

    def __init__(self, model: torch.nn.Module, tokens: torch.Tensor, targets: Sequence[tuple[str, torch.nn.Module]],
                 *, fisher: Mapping[str, torch.Tensor] | None = None, seed: int = 0,
                 device: str | torch.device | None = None) -> None:
        self.probe = KLProbe(model, tokens, targets, device=device)
        self.modules = dict(targets)
        self.index = {name: i for i, (name, _) in enumerate(targets)}
        self.original = {n: target_weight(m).detach().float().clone() for n, m in targets}
        self.fisher = fisher
        self.seed = seed
        self.decompositions = 0
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    def weight(self, name: str, config: str) -> torch.Tensor:
        """``Q + L1·L2`` of target ``name`` at ``config`` (decomposed once, then kept)."""
        key = (name, config)
        if key not in self._cache:
            W = self.original[name].to(self.probe.device)
            F = None if self.fisher is None else self.fisher[name].to(W.device)
            dec = decompose(W, QuantConfig.from_name(config, allow_unusual=True), F,
                            seed=self.seed * 100003 + self.index[name])
            self._cache[key] = dec.reconstruct()
            self.decompositions += 1
        return self._cache[key]

    def weights(self, assignments: Mapping[str, str]) -> dict[str, torch.Tensor]:
        """The weights of an allocation."""
        return {n: self.weight(n, c) for n, c in assignments.items()}

    def kl(self, assignments: Mapping[str, str]) -> float:
        """Mean KL per position of the model with this allocation (other targets left original)."""
        return self.probe.kl(self.weights(assignments))

    def move_kls(self, assignments: Mapping[str, str], moves: Sequence[Mapping[str, str]]) -> tuple[float, list[float]]:
        """``(KL of the allocation, [KL with each move applied])``: a move maps some targets to other
        configs; each is measured around the allocation, from the first block it touches."""
        base = self.weights(assignments)
        with self.probe.at(base) as probe:
            start = probe.kl({})
            return start, [probe.kl({n: self.weight(n, c) for n, c in move.items()}) for move in moves]
