"""``SolveOptions``: every setting of a solve or sweep, in one frozen, validated object.

The CLI builds one from its flags; :func:`bitalloc.solve`, :func:`solve_table` and the array
solvers take it as it is. The profile-table level reads ``objective``, ``ties``,
``min_bits``, ``max_bits`` and ``exclude_lowrank_from_budget``; the array solvers read the
rest (``backend``, ``time_limit``, ``mip_gap``, ``warm_start``, ``prune``, ``core``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .specs import PRESET_TOKEN, parse_bounds, tie_patterns
from .validation import check_backend, check_options


@dataclass(frozen=True)
class SolveOptions:
    """How to solve: the objective column, ties, bit bounds, budget convention and backend.

    ``objective``: ``plain`` (``error``), ``fisher`` (``error_fisher``), ``act``
    (``error_act``), ``kl`` (``error_kl``) or a profile column name; None picks ``fisher``
    when the profile has Fisher-weighted errors, else ``plain``.
    ``ties``: regexes whose matches share a config within each layer; the item ``"fuse"``
    stands for :data:`FUSE_PRESET` (q/k/v, gate/up, ...).
    ``min_bits`` / ``max_bits``: ``"REGEX=BITS"`` floors / ceilings on bits/param.
    ``exclude_lowrank_from_budget``: LQ-LoRA's convention, the budget leaves the low-rank
    factors out (achieved bits still count them).
    ``backend``: one of :data:`BACKENDS`; ``time_limit``: seconds per budget (None: no
    limit); ``mip_gap``: accepted relative optimality gap (0: exact).
    ``warm_start``: seed the MIP with the Lagrangian (and, in a sweep, the previous budget's)
    allocation; ``prune``: drop dominated configs first (lossless); ``core``: run the bounded
    dynamic-programming core search before the MIP.
    """

    objective: str | None = None
    ties: tuple[str, ...] = ()
    min_bits: tuple[str, ...] = ()
    max_bits: tuple[str, ...] = ()
    exclude_lowrank_from_budget: bool = False
    backend: str = "highs"
    time_limit: float | None = None
    mip_gap: float = 0.0
    warm_start: bool = True
    prune: bool = True
    core: bool = True

    def __post_init__(self) -> None:
        if self.objective is not None and (not isinstance(self.objective, str) or not self.objective):
            raise ValueError(f"objective must be plain, fisher, act, kl or a profile column name, got {self.objective!r}")
        set_ = object.__setattr__
        set_(self, "ties", tie_patterns(self.ties))
        set_(self, "min_bits", _bounds(self.min_bits))
        set_(self, "max_bits", _bounds(self.max_bits))
        set_(self, "backend", check_backend(self.backend))
        time_limit, mip_gap = check_options(self.time_limit, self.mip_gap)
        set_(self, "time_limit", time_limit)
        set_(self, "mip_gap", mip_gap)
        for name in ("exclude_lowrank_from_budget", "warm_start", "prune", "core"):
            set_(self, name, bool(getattr(self, name)))

    @classmethod
    def of(cls, options: SolveOptions | None = None, **changes: Any) -> SolveOptions:
        """``options`` (default: the defaults) with ``changes`` applied; names as the fields."""
        if options is None:
            return cls(**changes)
        if not isinstance(options, SolveOptions):
            raise ValueError(f"options must be a SolveOptions, got {type(options).__name__}")
        return dataclasses.replace(options, **changes) if changes else options

    def replace(self, **changes: Any) -> SolveOptions:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    @property
    def fuse(self) -> bool:
        """True when the ties include the fusion preset (``--fuse``)."""
        return PRESET_TOKEN in self.ties

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (tuples become lists)."""
        return {f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SolveOptions:
        """Rebuild from :meth:`to_dict`'s output; an unknown key is a ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown solve options {unknown}; known: {sorted(known)}")
        return cls(**dict(data))


def _bounds(specs: str | Sequence[Any] | None) -> tuple[str, ...]:
    """``REGEX=BITS`` specs as a tuple of strings, each checked (``(regex, bits)`` pairs become strings)."""
    if specs is None:
        return ()
    if isinstance(specs, str):
        specs = [specs]
    out = []
    for spec in specs:
        parse_bounds([spec])  # raises with the grammar in the message
        out.append(spec if isinstance(spec, str) else f"{spec[0]}={spec[1]}")
    return tuple(out)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
