"""Allocations: the solver run on a profile, as JSON in and out.

``bitalloc.solve(profile, budget)`` reads a profile directory (or a table already loaded),
solves, and returns an :class:`Allocation` whose :meth:`~Allocation.to_dict` is the
allocation JSON that ``apply`` and ``report`` read. ``bitalloc.sweep`` does the same over
many budgets and adds the Lagrangian hull.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from bitalloc.atomic import atomic_write_json
from bitalloc.profiles.store import load_profile
from bitalloc.solvers import TableSweep, solve_table, sweep_table

ALLOCATION_FORMAT = "bitalloc-allocation"
ALLOCATION_VERSION = 1


@dataclass
class Allocation:
    """A chosen config name per matrix, with what the solver says about it.

    ``data`` is the allocation JSON dict: at least ``budget``, ``bits_per_param`` (achieved,
    everything counted), ``objective``, ``status``, ``gap``, ``seconds``, ``backend``,
    ``profile`` and ``assignments`` (matrix name -> config name).
    """

    data: dict[str, Any] = field(default_factory=dict)

    @property
    def assignments(self) -> dict[str, str]:
        return dict(self.data["assignments"])

    @property
    def bits_per_param(self) -> float:
        return float(self.data["bits_per_param"])

    @property
    def status(self) -> str:
        return str(self.data["status"])

    def to_dict(self) -> dict[str, Any]:
        """The allocation JSON dict."""
        return dict(self.data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the allocation JSON atomically."""
        path = Path(path)
        atomic_write_json(path, self.data)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "Allocation":
        """Read an allocation JSON written by :meth:`save` (or `bitalloc solve --out`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a valid allocation JSON ({exc})") from exc
        missing = [k for k in ("budget", "bits_per_param", "assignments") if not isinstance(data, dict) or k not in data]
        if missing:
            raise ValueError(f"{path} is not a bitalloc allocation: missing keys {missing}")
        return cls(data)


def _table_and_meta(profile: Any) -> tuple[pd.DataFrame, dict[str, Any], str]:
    if isinstance(profile, pd.DataFrame):
        return profile, {}, "<table>"
    if isinstance(profile, tuple) and len(profile) == 2 and isinstance(profile[0], pd.DataFrame):
        return profile[0], dict(profile[1]), str(profile[1].get("path", "<table>"))
    df, meta = load_profile(profile)
    return df, meta, str(profile)


def default_objective(df: pd.DataFrame) -> str:
    """``fisher`` when the profile has Fisher-weighted errors, else ``plain``."""
    if "error_fisher" in df.columns and pd.to_numeric(df["error_fisher"], errors="coerce").notna().any():
        return "fisher"
    return "plain"


def _provenance(meta: dict[str, Any]) -> dict[str, Any]:
    keys = ("model", "model_hash", "space", "ranks", "fisher", "calibration", "seed")
    out = {k: meta.get(k) for k in keys if k in meta}
    if isinstance(meta.get("targets"), list):  # shapes let `apply` refuse a model they do not fit
        out["shapes"] = {t["name"]: [int(t["rows"]), int(t["cols"])] for t in meta["targets"]}
    return out


def solve(
    profile: Any,
    budget: float,
    *,
    objective: str | None = None,
    ties: Sequence[str] = (),
    min_bits: Sequence[str] = (),
    max_bits: Sequence[str] = (),
    exclude_lowrank_from_budget: bool = False,
    backend: str = "highs",
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> Allocation:
    """Solve a profile (a directory, or a ``(table, meta)`` pair) at ``budget`` bits/param.

    ``objective``: ``fisher`` or ``plain`` (default: fisher when the profile has it);
    ``ties``: regexes whose matches share a config within each layer (``"fuse"`` = preset);
    ``min_bits``/``max_bits``: ``"REGEX=BITS"`` floors/ceilings on bits/param.
    """
    df, meta, profile_id = _table_and_meta(profile)
    objective = objective or default_objective(df)
    data = solve_table(
        df, budget, objective=objective, ties=ties, min_bits=min_bits,
        max_bits=max_bits, exclude_lowrank_from_budget=exclude_lowrank_from_budget,
        backend=backend, time_limit=time_limit, mip_gap=mip_gap,
    ).to_dict(profile_id)
    data.update(_header(objective, ties, min_bits, max_bits, exclude_lowrank_from_budget, meta))
    return Allocation(data)


def _header(objective, ties, min_bits, max_bits, exclude_lowrank, meta) -> dict[str, Any]:
    return {
        "format": ALLOCATION_FORMAT, "format_version": ALLOCATION_VERSION,
        "objective_column": objective, "ties": list(ties), "min_bits": list(min_bits),
        "max_bits": list(max_bits), "exclude_lowrank_from_budget": bool(exclude_lowrank),
        "provenance": _provenance(meta),
    }


def sweep(
    profile: Any,
    budgets: Sequence[float] | str,
    *,
    objective: str | None = None,
    ties: Sequence[str] = (),
    min_bits: Sequence[str] = (),
    max_bits: Sequence[str] = (),
    exclude_lowrank_from_budget: bool = False,
    backend: str = "highs",
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> tuple[pd.DataFrame, list[Allocation], TableSweep]:
    """Exact solves over many budgets (``"2.25:4.5:0.05"`` or a list) plus the Lagrangian hull.

    Returns ``(pareto, allocations, raw)``: ``pareto`` has one ``kind == "ilp"`` row per
    budget and one ``kind == "hull"`` row per hull vertex; columns ``kind``, ``budget``,
    ``bits_per_param``, ``objective``, ``bound``, ``status``, ``gap``, ``seconds``,
    ``objective_column``.
    """
    df, meta, profile_id = _table_and_meta(profile)
    objective = objective or default_objective(df)
    raw = sweep_table(
        df, budgets, objective=objective, ties=ties, min_bits=min_bits,
        max_bits=list(max_bits), exclude_lowrank_from_budget=exclude_lowrank_from_budget,
        backend=backend, time_limit=time_limit, mip_gap=mip_gap,
    )
    header = _header(objective, ties, min_bits, max_bits, exclude_lowrank_from_budget, meta)
    allocations = []
    for data in raw.allocations(profile_id):
        data.update(header)
        allocations.append(Allocation(data))
    ilp = raw.frame()
    ilp.insert(0, "kind", "ilp")
    hull = raw.hull.copy()
    hull.insert(0, "kind", "hull")
    pareto = pd.concat([ilp, hull], ignore_index=True, sort=False)
    pareto["objective_column"] = objective
    pareto["profile"] = profile_id
    # provenance, so that `bitalloc report` can refuse a sweep made from another profile
    pareto["model_hash"] = meta.get("model_hash")
    pareto["profile_sha256"] = (meta.get("table") or {}).get("sha256")
    return pareto, allocations, raw

