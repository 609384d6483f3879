"""Layers and matrix kinds derived from target names, for any architecture.

A dotted target name is split at its *first* purely numeric component: what comes before
it and the number make the layer (``model.layers.3``), what comes after is the matrix kind
(``self_attn.q_proj``, ``mlp.down_proj``, ``attention.self.query``, ``attn.c_attn``).
Splitting at the first number (rather than the last) keeps nested indices inside the kind,
so T5's ``encoder.block.0.layer.1.DenseReluDense.wi`` is block 0 of kind
``layer.1.DenseReluDense.wi`` and an MoE expert ``layers.0.experts.3.w1`` is layer 0 of kind
``experts.3.w1``. Names without any numeric component go to the layer ``other``.
No architecture-specific name lists.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

OTHER = "other"


@dataclass(frozen=True)
class NamePart:
    """One target name split into its layer (``stem`` + ``index``) and its matrix kind."""

    name: str
    stem: str  # the components before the layer number ("model.layers"); "" for OTHER
    index: int | None  # the layer number, None when the name has no numeric component
    kind: str  # the components after the layer number

    @property
    def layer(self) -> str:
        """``stem.index`` (e.g. ``model.layers.3``), or ``other``."""
        if self.index is None:
            return OTHER
        return f"{self.stem}.{self.index}" if self.stem else str(self.index)


def split_name(name: str) -> NamePart:
    """Split a dotted target name into layer and kind (see the module docstring)."""
    parts = str(name).split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            kind = ".".join(parts[i + 1:]) or ".".join(parts[:i]) or str(name)
            return NamePart(name=str(name), stem=".".join(parts[:i]), index=int(part), kind=kind)
    return NamePart(name=str(name), stem="", index=None, kind=str(name))


@dataclass
class LayerGrid:
    """Target names laid out as a grid: rows are layers, columns matrix kinds.

    ``cell[(row_label, kind)]`` is the target name in that cell; ``rows`` and ``kinds`` keep a
    natural order (layers by stem then number, ``other`` last; kinds in first-seen order).
    """

    rows: list[str]
    kinds: list[str]
    cell: dict[tuple[str, str], str]

    def position(self, name: str) -> tuple[int, int]:
        """(row, column) of a target name."""
        for (row, kind), value in self.cell.items():
            if value == name:
                return self.rows.index(row), self.kinds.index(kind)
        raise KeyError(name)


def layer_grid(names: Iterable[str]) -> LayerGrid:
    """Lay target names out by layer and kind; row labels drop the stem when all layers share one."""
    split = [split_name(n) for n in names]
    stems = {p.stem for p in split if p.index is not None}
    single_stem = len(stems) <= 1

    def row_label(p: NamePart) -> str:
        if p.index is None:
            return OTHER
        return str(p.index) if single_stem else p.layer

    order: dict[str, tuple] = {}
    kinds: list[str] = []
    cell: dict[tuple[str, str], str] = {}
    for p in split:
        label = row_label(p)
        order.setdefault(label, (1, "", 0) if p.index is None else (0, p.stem, p.index))
        if p.kind not in kinds:
            kinds.append(p.kind)
        key = (label, p.kind)
        if key in cell:  # two names in one cell (e.g. "a.0.x" and "b.0.x" with one stem): keep apart
            key = (label, p.name)
            if p.name not in kinds:
                kinds.append(p.name)
        cell[key] = p.name
    rows = sorted(order, key=lambda r: order[r])
    return LayerGrid(rows=rows, kinds=kinds, cell=cell)


def short_name(name: str) -> str:
    """A compact label: ``L3 self_attn.q_proj`` (or the name itself when it has no layer)."""
    p = split_name(name)
    return p.name if p.index is None else f"L{p.index} {p.kind}"
