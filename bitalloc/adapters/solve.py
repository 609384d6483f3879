"""Allocations for adapter profiles: the exact solver over every module of every adapter.

One budget for the whole fleet (default), one budget per adapter (``per_adapter``), or the
paper's fixed ``b@ρ`` rule (``variant``) written in the same JSON for comparison. Budgets and
``bits_per_param`` count every stored bit over the LoRA parameters ``Σ r·(rows + cols)``;
``bits_per_param_codes`` is the paper's codes-only average.

Backends: an adapter allocation is a multiple-choice knapsack with one small group per
module, and over a fleet the Lagrangian (convex-hull) allocation is within one module's
step of the optimum; its lower bound certifies the gap. The default ``auto`` takes that
allocation when its certified gap is at most :data:`AUTO_GAP` and runs the exact ``highs``
MIP otherwise (small problems, e.g. one adapter, where the MIP takes seconds). Measured on
synthetic fleets in ``reports/adapters_fleet``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from bitalloc.adapters.config import Variant
from bitalloc.adapters.profile import AdapterProfile, load_adapter_profile, singular_values
from bitalloc.atomic import atomic_write_json
from bitalloc.solvers import InfeasibleBudgetError, Solution, solve
from bitalloc.solvers.solution import json_ready

ALLOCATION_FORMAT = "bitalloc-adapter-allocation"
ALLOCATION_VERSION = 1
#: Objective names and the profile columns they read.
OBJECTIVES = {"plain": "error", "act": "error_act"}
_STATUS_ORDER = ("optimal", "gap_limit", "time_limit", "feasible", "failed", "fixed")
#: Backends of :func:`solve_adapters`: ``auto`` and those of :func:`bitalloc.solvers.solve`.
ADAPTER_BACKENDS = ("auto", "highs", "pulp-highs", "pulp-cbc", "lagrange")
#: Certified relative gap up to which ``auto`` keeps the Lagrangian allocation without a MIP
#: (1,000 synthetic adapters: gap about 1e-7; one adapter of 210 modules: up to about 1e-3).
AUTO_GAP = 1e-4


@dataclass(frozen=True)
class AdapterAllocation:
    """An adapter allocation: ``data`` is its JSON dict (``assignments``: ``ADAPTER/MODULE`` -> config)."""

    data: dict[str, Any]

    @property
    def assignments(self) -> dict[str, str]:
        return dict(self.data["assignments"])

    @property
    def bits_per_param(self) -> float:
        return float(self.data["bits_per_param"])

    def to_dict(self) -> dict[str, Any]:
        """The allocation JSON dict."""
        return dict(self.data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the JSON atomically."""
        atomic_write_json(Path(path), self.data)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "AdapterAllocation":
        """Read an allocation written by :meth:`save` (or `bitalloc adapter solve --out`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a valid allocation JSON ({exc})") from exc
        if not isinstance(data, dict) or data.get("format") != ALLOCATION_FORMAT:
            found = data.get("format") if isinstance(data, dict) else None
            raise ValueError(f"{path} is not an adapter allocation (format {found!r}); make one with `bitalloc adapter solve`")
        return cls(data)


@dataclass(frozen=True)
class _Arrays:
    matrices: list[str]
    adapters: np.ndarray  # (M,) adapter name of each matrix
    configs: list[str]
    error: np.ndarray  # (M, C)
    bits: np.ndarray  # (M, C)
    codes: np.ndarray  # (M, C)
    params: np.ndarray  # (M,)


def _arrays(profile: AdapterProfile, objective: str) -> _Arrays:
    column = OBJECTIVES.get(objective, objective)
    df = profile.table
    hint = " (activation-weighted errors need a profile made with --model and --calib)" if objective == "act" else ""
    if column not in df.columns:
        raise ValueError(f"objective {objective!r}: the adapter profile has no column {column!r}{hint}")
    if pd.to_numeric(df[column], errors="coerce").isna().all():
        raise ValueError(f"objective {objective!r}: the adapter profile's column {column!r} is empty{hint}")
    order = df["index"].to_numpy()
    m_idx, _ = pd.factorize(order, sort=True)
    c_idx, configs = pd.factorize(df["config"].astype(str), sort=False)
    n_mat, n_cfg = int(m_idx.max()) + 1, len(configs)

    def pivot(values: Any) -> np.ndarray:
        out = np.full((n_mat, n_cfg), np.nan)
        out[m_idx, c_idx] = np.asarray(values, dtype=np.float64)
        return out

    first = df.groupby(m_idx, sort=True).first()
    return _Arrays(
        matrices=first["matrix"].astype(str).tolist(),
        adapters=first["adapter"].astype(str).to_numpy(),
        configs=[str(c) for c in configs],
        error=pivot(df[column]),
        bits=pivot(df["storage_bits"]),
        codes=pivot(df["code_bits"]),
        params=first["params"].to_numpy(dtype=np.float64),
    )


def _summary(arr: _Arrays, rows: np.ndarray, choice: np.ndarray) -> dict[str, Any]:
    params = float(arr.params[rows].sum())
    bits = float(arr.bits[rows, choice].sum())
    return {
        "bits_per_param": bits / params,
        "bits_per_param_codes": float(arr.codes[rows, choice].sum()) / params,
        "objective": float(arr.error[rows, choice].sum()),
        "total_bits": bits,
        "params": params,
        "modules": int(rows.size),
    }


def solve_arrays(
    error: Any, bits: Any, params: Any, budget: float, *, backend: str = "auto",
    matrix_names: Sequence[str] | None = None, **options: Any,
) -> tuple[Solution, str]:
    """:func:`bitalloc.solvers.solve` with the ``auto`` backend too; returns the solution and the backend used.

    ``options`` (``time_limit``, ``mip_gap``) go to the exact backends.
    """
    args = (error, bits, params, budget)
    if backend not in ADAPTER_BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; choose one of {list(ADAPTER_BACKENDS)}")
    if backend != "auto":
        extra = {} if backend == "lagrange" else options
        return solve(*args, matrix_names=matrix_names, backend=backend, **extra), backend
    sol = solve(*args, matrix_names=matrix_names, backend="lagrange")
    if sol.status == "optimal" or sol.gap <= AUTO_GAP:
        return sol, "lagrange"
    return solve(*args, matrix_names=matrix_names, backend="highs", **options), "highs"


def _solve_rows(arr: _Arrays, rows: np.ndarray, budget: float, *, backend: str, **options: Any
                ) -> tuple[np.ndarray, dict[str, Any]]:
    sol, used = solve_arrays(arr.error[rows], arr.bits[rows], arr.params[rows], budget, backend=backend,
                             matrix_names=[arr.matrices[i] for i in rows], **options)
    info = _summary(arr, rows, sol.choice)
    info.update(status=sol.status, gap=sol.gap, bound=sol.bound, seconds=sol.seconds, budget=budget,
                n_candidates=sol.n_candidates, n_candidates_after_pruning=sol.n_candidates_after_pruning,
                note=sol.note, backend=used)
    return sol.choice, info


def _min_budget(arr: _Arrays, rows: np.ndarray) -> float:
    cheapest = np.nanmin(np.where(np.isfinite(arr.error[rows]), arr.bits[rows], np.nan), axis=1)
    return float(cheapest.sum() / arr.params[rows].sum())


def _variant_choice(arr: _Arrays, profile: AdapterProfile, variant: Variant) -> np.ndarray:
    col = {c: j for j, c in enumerate(arr.configs)}
    modules = profile.modules.sort_values("index")
    choice = np.empty(len(arr.matrices), dtype=np.int64)
    for m, sv in enumerate(singular_values(modules)):
        name = variant.config(sv).name
        j = col.get(name)
        if j is None or not np.isfinite(arr.error[m, j]):
            raise ValueError(
                f"variant {variant.name} gives {arr.matrices[m]} the config {name}, which the profile lacks; "
                f"profile with bits {variant.bits} and group {variant.group} in the space"
            )
        choice[m] = j
    return choice


def solve_adapters(
    profile: str | os.PathLike[str] | AdapterProfile,
    budget: float | None = None,
    *,
    objective: str = "plain",
    per_adapter: bool = False,
    variant: str | Variant | None = None,
    h_rule: str = "paper",
    backend: str = "auto",
    time_limit: float | None = None,
    mip_gap: float = 0.0,
) -> AdapterAllocation:
    """Solve an adapter profile at ``budget`` bits/param (everything counted).

    ``backend``: ``auto`` (default: the Lagrangian allocation when its certified gap is at
    most :data:`AUTO_GAP`, else the exact ``highs`` MIP), ``lagrange``, or an exact MIP
    backend (``highs``, ``pulp-highs``, ``pulp-cbc``) with ``time_limit`` and ``mip_gap``.

    ``per_adapter``: one budget for each adapter instead of one for the fleet; ``variant``
    (``"2@0.8"``): the paper's fixed rule instead of the solver (no budget), with ``h_rule``
    ``"paper"`` or ``"code"``. An infeasible budget raises :class:`InfeasibleBudgetError`
    naming the minimum (per adapter with ``per_adapter``).
    """
    t0 = time.perf_counter()
    if backend not in ADAPTER_BACKENDS:
        raise ValueError(f"unknown solver backend {backend!r}; choose one of {list(ADAPTER_BACKENDS)}")
    if not isinstance(profile, AdapterProfile):
        profile = load_adapter_profile(profile)
    arr = _arrays(profile, objective)
    names = list(dict.fromkeys(arr.adapters.tolist()))
    groups = {name: np.flatnonzero(arr.adapters == name) for name in names}
    everything = np.arange(len(arr.matrices))
    per: dict[str, dict[str, Any]] = {}
    if variant is not None:
        if budget is not None or per_adapter:
            raise ValueError("--variant is the paper's fixed rule: it takes no --budget or --per-adapter")
        variant = variant if isinstance(variant, Variant) else Variant.parse(str(variant), rule=h_rule)
        choice = _variant_choice(arr, profile, variant)
        for name, rows in groups.items():
            per[name] = _summary(arr, rows, choice[rows]) | {"status": "fixed"}
        head = {"budget": None, "status": "fixed", "gap": None, "bound": None, "backend": "variant",
                "mode": "variant", "variant": variant.name, "h_rule": variant.rule, "n_candidates": None,
                "n_candidates_after_pruning": None, "note": f"LoRAQuant's fixed rule {variant.name} ({variant.rule} h rule)"}
    else:
        if budget is None:
            raise ValueError("give a --budget in bits/param (or --variant b@rho for the paper's fixed rule)")
        budget = float(budget)
        options = dict(backend=backend, time_limit=time_limit, mip_gap=mip_gap)
        if per_adapter:
            short = {n: _min_budget(arr, rows) for n, rows in groups.items()}
            short = {n: v for n, v in short.items() if v > budget * (1 + 1e-12)}
            if short:
                name, least = max(short.items(), key=lambda kv: kv[1])
                err = InfeasibleBudgetError(budget, least)
                err.args = (f"{err.args[0]}; adapter {name!r} needs at least {least:.4f} bits/param on its own",)
                raise err
            choice = np.empty(len(arr.matrices), dtype=np.int64)
            for name, rows in groups.items():
                choice[rows], per[name] = _solve_rows(arr, rows, budget, **options)
            statuses = [p["status"] for p in per.values()]
            status = max(statuses, key=lambda s: _STATUS_ORDER.index(s) if s in _STATUS_ORDER else len(_STATUS_ORDER))
            gaps = [p["gap"] for p in per.values()]
            head = {"budget": budget, "status": status, "gap": max(gaps) if all(g is not None for g in gaps) else None,
                    "bound": sum(p["bound"] for p in per.values()), "mode": "per-adapter",
                    "backend": "+".join(sorted({p["backend"] for p in per.values()})),
                    "n_candidates": sum(p["n_candidates"] for p in per.values()),
                    "n_candidates_after_pruning": sum(p["n_candidates_after_pruning"] for p in per.values()),
                    "note": "one budget per adapter"}
        else:
            choice, info = _solve_rows(arr, everything, budget, **options)
            for name, rows in groups.items():
                per[name] = _summary(arr, rows, choice[rows])
            head = {k: info[k] for k in ("budget", "status", "gap", "bound", "n_candidates",
                                         "n_candidates_after_pruning", "note", "backend")} | {"mode": "fleet"}
        head |= {"variant": None, "h_rule": None}
    total = _summary(arr, everything, choice)
    data: dict[str, Any] = {
        "format": ALLOCATION_FORMAT,
        "format_version": ALLOCATION_VERSION,
        "budget": head["budget"],
        "bits_per_param": total["bits_per_param"],
        "bits_per_param_codes": total["bits_per_param_codes"],
        "objective": total["objective"],
        "bound": head["bound"],
        "status": head["status"],
        "gap": head["gap"],
        "seconds": time.perf_counter() - t0,
        "backend": head["backend"],
        "profile": str(profile.path),
        "mode": head["mode"],
        "variant": head["variant"],
        "h_rule": head["h_rule"],
        "objective_column": OBJECTIVES.get(objective, objective),
        "total_bits": total["total_bits"],
        "total_params": total["params"],
        "n_matrices": len(arr.matrices),
        "n_candidates": head["n_candidates"],
        "n_candidates_after_pruning": head["n_candidates_after_pruning"],
        "note": head["note"],
        "adapters": per,
        "provenance": {
            "base_model": profile.meta.get("base_model"),
            "adapters": [{k: a.get(k) for k in ("name", "path", "sha256")} for a in profile.meta.get("adapters", [])],
            "profile_sha256": (profile.meta.get("table") or {}).get("sha256"),
        },
        "assignments": {arr.matrices[m]: arr.configs[int(c)] for m, c in enumerate(choice)},
    }
    return AdapterAllocation(json_ready(data))


def fleet_min_budget(profile: str | os.PathLike[str] | AdapterProfile) -> float:
    """The least feasible fleet budget (every module at its cheapest config)."""
    if not isinstance(profile, AdapterProfile):
        profile = load_adapter_profile(profile)
    arr = _arrays(profile, "plain")
    return _min_budget(arr, np.arange(len(arr.matrices)))

