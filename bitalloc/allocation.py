"""Allocations: the solver run on a profile, as JSON in and out.

``bitalloc.solve(profile, budget, options)`` reads a profile directory (or a table already
loaded), solves with one :class:`SolveOptions`, and returns an :class:`Allocation`, whose
:meth:`~Allocation.to_dict` is the allocation JSON that ``apply`` and ``report`` read.
``bitalloc.sweep`` does the same over many budgets and adds the Lagrangian hull.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from bitalloc.atomic import atomic_write_json
from bitalloc.models import Calibration, calibration_fisher, find_targets, load_model, resolve_device
from bitalloc.models.allocation_probe import AllocationProbe
from bitalloc.models.calibration import calibration_token_source
from bitalloc.profiles.store import load_profile
from bitalloc.solvers import (MissingObjectiveError, SolveOptions, TableProblem, TableSolution, TableSweep,
                              default_objective, solve_table, sweep_table)

__all__ = ["ALLOCATION_FORMAT", "ALLOCATION_VERSION", "Allocation", "RefineOptions", "SolveOptions",
           "default_objective", "refine", "solve", "sweep"]

ALLOCATION_FORMAT = "bitalloc-allocation"
ALLOCATION_VERSION = 1

#: Keys an allocation JSON must have.
REQUIRED_KEYS = ("budget", "bits_per_param", "assignments")


@dataclass(frozen=True, kw_only=True)
class Allocation:
    """A chosen config name per matrix, with what the solver says about it.

    The fields are the keys of the allocation JSON, in its order. ``bits_per_param``
    counts every stored bit; ``budget_bits_per_param`` what the budget counted (less when
    ``exclude_lowrank_from_budget``). ``objective`` is the predicted error, ``bound`` a
    proven lower bound, ``gap`` their relative difference. ``objective_column``, ``ties``,
    ``min_bits``, ``max_bits`` and ``exclude_lowrank_from_budget`` are the options as given;
    ``provenance`` names the profile's model, hash, space and target shapes. Numbers the
    solver could not give (an infeasible budget) are None. ``extra`` keeps keys this version
    does not know, so that they survive a load and save.
    """

    budget: float
    bits_per_param: float | None
    budget_bits_per_param: float | None = None
    objective: float | None = None
    bound: float | None = None
    status: str | None = None
    gap: float | None = None
    seconds: float | None = None
    backend: str | None = None
    profile: str | None = None
    n_matrices: int | None = None
    n_candidates: int | None = None
    n_candidates_after_pruning: int | None = None
    bits_histogram: dict[str, int] = field(default_factory=dict)
    note: str = ""
    assignments: dict[str, str] = field(default_factory=dict)
    objective_column: str | None = None
    exclude_lowrank_from_budget: bool = False
    n_configs: int | None = None
    total_params: int | None = None
    ties: tuple[Any, ...] = ()
    min_bits: tuple[Any, ...] = ()
    max_bits: tuple[Any, ...] = ()
    params_by_bits: dict[str, float] | None = None  # absent from the JSON when None
    format: str = ALLOCATION_FORMAT
    format_version: int = ALLOCATION_VERSION
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        budget = _number(self.budget, "budget")
        if budget is None or budget <= 0:
            raise ValueError(f"an allocation's budget must be a positive number of bits/param, got {self.budget!r}")
        set_(self, "budget", budget)
        for name in ("bits_per_param", "budget_bits_per_param", "objective", "bound", "gap", "seconds"):
            set_(self, name, _number(getattr(self, name), name))
        for name in ("n_matrices", "n_candidates", "n_candidates_after_pruning", "n_configs", "total_params"):
            value = getattr(self, name)
            set_(self, name, None if value is None else int(value))
        if not isinstance(self.assignments, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in self.assignments.items()):
            raise ValueError("an allocation's assignments must map matrix names to config names")
        set_(self, "assignments", dict(self.assignments))
        for name in ("bits_histogram", "provenance", "extra"):
            set_(self, name, dict(getattr(self, name) or {}))
        if self.params_by_bits is not None:
            set_(self, "params_by_bits", dict(self.params_by_bits))
        for name in ("ties", "min_bits", "max_bits"):
            value = getattr(self, name)
            set_(self, name, (value,) if isinstance(value, str) else tuple(value or ()))
        set_(self, "exclude_lowrank_from_budget", bool(self.exclude_lowrank_from_budget))
        set_(self, "note", str(self.note or ""))
        set_(self, "format_version", int(self.format_version))

    @property
    def feasible(self) -> bool:
        """False for the marker of an infeasible budget in a sweep (no assignments)."""
        return self.status != "infeasible"

    def to_dict(self) -> dict[str, Any]:
        """The allocation JSON dict (``params_by_bits`` only when known, ``extra`` keys last)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "extra" or (f.name == "params_by_bits" and value is None):
                continue
            out[f.name] = list(value) if isinstance(value, tuple) else (dict(value) if isinstance(value, dict) else value)
        out.update(self.extra)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the data") -> Allocation:
        """Read an allocation JSON dict; ``source`` names it in errors."""
        missing = [k for k in REQUIRED_KEYS if not isinstance(data, Mapping) or k not in data]
        if missing:
            raise ValueError(f"{source} is not a bitalloc allocation: missing keys {missing}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        fields = {k: v for k, v in data.items() if k in known}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**fields, extra=extra)

    @classmethod
    def from_result(
        cls, result: TableSolution, profile_id: str, options: SolveOptions, meta: Mapping[str, Any]
    ) -> Allocation:
        """One solved budget as an allocation: the solver's answer, ``options`` as given, provenance."""
        data = result.to_dict(profile_id)
        data.update({
            "format": ALLOCATION_FORMAT, "format_version": ALLOCATION_VERSION,
            "objective_column": options.objective, "ties": list(options.ties), "min_bits": list(options.min_bits),
            "max_bits": list(options.max_bits), "exclude_lowrank_from_budget": options.exclude_lowrank_from_budget,
            "provenance": _provenance(meta),
        })
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the allocation JSON atomically."""
        path = Path(path)
        atomic_write_json(path, self.to_dict())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Allocation:
        """Read an allocation JSON written by :meth:`save` (or `bitalloc solve --out`)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not a valid allocation JSON ({exc})") from exc
        return cls.from_dict(data, source=str(path))


def _number(value: Any, name: str) -> float | None:
    """A float, or None for a missing or non-finite value (JSON has no NaN)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"an allocation's {name} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"an allocation's {name} must be a number, got {value!r}") from None
    return number if math.isfinite(number) else None


def _table_and_meta(profile: Any) -> tuple[pd.DataFrame, dict[str, Any], str]:
    if isinstance(profile, pd.DataFrame):
        return profile, {}, "<table>"
    if isinstance(profile, tuple) and len(profile) == 2 and isinstance(profile[0], pd.DataFrame):
        return profile[0], dict(profile[1]), str(profile[1].get("path", "<table>"))
    df, meta = load_profile(profile)
    return df, meta, str(profile)


def _provenance(meta: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("model", "model_hash", "space", "ranks", "fisher", "calibration", "seed", "include", "exclude")
    out = {k: meta.get(k) for k in keys if k in meta}
    if isinstance(meta.get("targets"), list):  # shapes let `apply` refuse a model they do not fit
        out["shapes"] = {t["name"]: [int(t["rows"]), int(t["cols"])] for t in meta["targets"]}
    return out


def profile_command(meta: Mapping[str, Any], out: str) -> str:
    """The `bitalloc profile` command line that resumes the profile in ``out`` (made as ``meta`` says)
    with every optional column on: rerun, it keeps the finished matrices and adds what is missing."""
    words = ["bitalloc", "profile", "--out", out]
    if meta.get("model") is not None:
        words += ["--model", str(meta["model"])]
    for key in ("space", "include", "exclude"):
        if meta.get(key) is not None:
            words += [f"--{key}", str(meta[key])]
    if meta.get("ranks"):
        words += ["--ranks", ",".join(str(r) for r in meta["ranks"])]
    calibration = meta.get("calibration") or {}
    if calibration:
        words += ["--calib", str(calibration["source"]), "--samples", str(calibration["samples"]),
                  "--seqlen", str(calibration["seqlen"])]
    if meta.get("fisher") is False:
        words.append("--no-fisher")
    if meta.get("seed"):
        words += ["--seed", str(meta["seed"])]
    if meta.get("shard"):
        words += ["--shard", str(meta["shard"])]
    return shlex.join(words)


def _options_for(df: pd.DataFrame, options: SolveOptions | None, changes: dict[str, Any],
                 meta: Mapping[str, Any] | None = None, profile_id: str = "PROFILE") -> SolveOptions:
    """``options`` with ``changes``, its objective resolved for this profile and checked against its columns
    (a missing one is a ValueError naming the command that adds it)."""
    options = SolveOptions.of(options, **changes)
    options = options if options.objective else options.replace(objective=default_objective(df))
    try:
        TableProblem.check_objective(df, options.objective)
    except MissingObjectiveError as exc:
        if not meta:
            raise
        if exc.column == "error_fisher":  # a profile made without a Fisher estimate does not resume with one
            fresh = dict(meta, fisher=True)
            raise MissingObjectiveError(
                exc.objective, exc.column,
                f"objective {exc.objective!r} needs Fisher-weighted errors (error_fisher), which this profile was made without "
                f"(--no-fisher); profile again into another directory: "
                f"`{profile_command(fresh, profile_id.rstrip('/') + '-fisher')}`") from None
        raise MissingObjectiveError(exc.objective, exc.column, f"{exc}: `{profile_command(meta, profile_id)}`") from None
    return options


def solve(profile: Any, budget: float, options: SolveOptions | None = None, **changes: Any) -> Allocation:
    """Solve a profile (a directory, or a ``(table, meta)`` pair) at ``budget`` bits/param.

    ``options`` is a :class:`SolveOptions`; ``changes`` are its fields given by name
    (``objective="plain"``, ``ties=["fuse"]``, ``min_bits=["down_proj=4"]``, ...).
    """
    df, meta, profile_id = _table_and_meta(profile)
    options = _options_for(df, options, changes, meta, profile_id)
    return Allocation.from_result(solve_table(df, budget, options), profile_id, options, meta)


def sweep(
    profile: Any, budgets: Sequence[float] | str, options: SolveOptions | None = None, *, progress: bool = True,
    **changes: Any
) -> tuple[pd.DataFrame, list[Allocation], TableSweep]:
    """Exact solves over many budgets (``"2.25:4.5:0.05"`` or a list) plus the Lagrangian hull.

    Options as in :func:`solve`. Returns ``(pareto, allocations, raw)``: ``pareto`` has one
    ``kind == "ilp"`` row per budget and one ``kind == "hull"`` row per hull vertex; columns
    ``kind``, ``budget``, ``bits_per_param``, ``objective``, ``bound``, ``status``, ``gap``,
    ``seconds``, ``objective_column``. ``progress`` shows a bar in budgets.
    """
    df, meta, profile_id = _table_and_meta(profile)
    options = _options_for(df, options, changes, meta, profile_id)
    raw = sweep_table(df, budgets, options, progress=progress)
    allocations = [Allocation.from_result(r, profile_id, options, meta) for r in raw.results]
    ilp = raw.frame()
    ilp.insert(0, "kind", "ilp")
    hull = raw.hull.copy()
    hull.insert(0, "kind", "hull")
    pareto = pd.concat([ilp, hull], ignore_index=True, sort=False)
    pareto["objective_column"] = options.objective
    pareto["profile"] = profile_id
    # provenance, so that `bitalloc report` can refuse a sweep made from another profile
    pareto["model_hash"] = meta.get("model_hash")
    pareto["profile_sha256"] = (meta.get("table") or {}).get("sha256")
    return pareto, allocations, raw


@dataclass(frozen=True)
class RefineOptions:
    """How :func:`refine` measures around an allocation.

    ``iterations``: measure-correct-solve rounds; ``windows``: calibration sequences the KL is
    measured on (None: the profile's KL probe windows, else 2); ``clip``: a matrix's factor
    changes by at most this ratio per round (measurements of single moves are noisy);
    ``device``: where the model runs.
    """

    iterations: int = 1
    windows: int | None = None
    clip: float = 4.0
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"refine iterations must be a positive integer, got {self.iterations!r}")
        if self.windows is not None and (not isinstance(self.windows, int) or self.windows < 1):
            raise ValueError(f"refine windows must be a positive integer, got {self.windows!r}")
        if not self.clip > 1:
            raise ValueError(f"refine clip must be > 1, got {self.clip!r}")


def _neighbours(error: np.ndarray, bits: np.ndarray, group: list[int], current: int) -> list[int]:
    """The group's next config up (more bits, less error) and down (fewer bits) on its Pareto front."""
    err, cost = error[group].sum(axis=0), bits[group].sum(axis=0)
    ok = np.flatnonzero(np.isfinite(err) & np.isfinite(cost))
    front = []  # by bits, each with less error than every cheaper one
    for c in ok[np.lexsort((err[ok], cost[ok]))]:
        if not front or err[c] < err[front[-1]]:
            front.append(int(c))
    up = [c for c in front if cost[c] > cost[current] and err[c] < err[current]]
    down = [c for c in front if cost[c] < cost[current]]
    return ([up[0]] if up else []) + ([down[-1]] if down else [])


def refine(profile: Any, budget: float, options: SolveOptions | None = None,
           refinement: RefineOptions | int = 1, **changes: Any) -> Allocation:
    """Solve, then correct the per-matrix factors of the objective by measured KL around the answer and re-solve.

    Each round measures, around the current allocation, the KL when each matrix (or tied group)
    moves one step up or down its Pareto front of configs, scales that matrix's objective column
    by the ratio of measured to predicted change (least squares, clipped to ``clip``), solves
    again and measures the new allocation's KL. The answer is the allocation with the lowest
    measured KL seen, the first one included, so it is never worse than plain solving; its key
    ``refinement`` records the measured KLs, the factors and the cost.
    """
    refinement = RefineOptions(iterations=refinement) if isinstance(refinement, int) else refinement
    df, meta, profile_id = _table_and_meta(profile)
    options = _options_for(df, options, changes, meta, profile_id)
    if not meta.get("model"):
        raise ValueError("refining needs the profile's model; give a profile directory (its meta.json names it)")
    started = time.perf_counter()
    problem = TableProblem.build(df, options)
    matrices, configs = problem.arrays.matrices, problem.arrays.configs
    column = problem.arrays.objective_column
    device = resolve_device(refinement.device)
    model, tokenizer = load_model(meta["model"])
    targets = [t for t in find_targets(model, include=meta.get("include"), exclude=meta.get("exclude"))
               if t[0] in set(matrices)]
    if len(targets) != len(matrices):
        raise ValueError(f"the model {meta['model']!r} lacks {len(matrices) - len(targets)} of the profile's matrices")
    seed = int(meta.get("seed") or 0)
    calibration = (Calibration.from_dict(meta["calibration"]) if meta.get("calibration")
                   else Calibration.for_device(device))
    windows = refinement.windows or int((meta.get("kl") or {}).get("windows") or 2)
    tokens = calibration_token_source(calibration, model, tokenizer, seed=seed, progress=refinement.progress)()
    fisher = (calibration_fisher(model, tokenizer, targets, calibration, model_id=meta["model"],
                                 model_hash=meta.get("model_hash", ""), seed=seed, device=device,
                                 progress=refinement.progress) if meta.get("fisher") else None)
    probe = AllocationProbe(model, tokens[:windows], targets, fisher=fisher, seed=seed, device=device)
    position = {c: k for k, c in enumerate(configs)}
    groups = [list(g) for g in problem.ties]
    tied = {m for g in groups for m in g}
    groups += [[m] for m in range(len(matrices)) if m not in tied]
    factor = np.ones(len(matrices))

    def solve_scaled() -> Allocation:
        scaled = df.assign(**{column: df[column] * df["matrix"].map(dict(zip(matrices, factor)))})
        return Allocation.from_result(solve_table(scaled, budget, options), profile_id, options, meta)

    current = solve_scaled()
    kl_start = probe.kl(current.assignments)
    best, best_kl, best_round = current, kl_start, 0
    rounds: list[dict[str, Any]] = []
    for round_ in range(1, refinement.iterations + 1):
        choice = np.array([position[current.assignments[m]] for m in matrices])
        error = problem.error * factor[:, None]
        moves, predicted, owner = [], [], []
        for k, group in enumerate(groups):
            for c in _neighbours(error, problem.bits, group, int(choice[group[0]])):
                moves.append({matrices[m]: configs[c] for m in group})
                predicted.append(float(sum(error[m, c] - error[m, choice[m]] for m in group)))
                owner.append(k)
        at, kls = probe.move_kls(current.assignments, moves)
        corrected = 0
        for k, group in enumerate(groups):
            pairs = [(p, kl - at) for p, kl, o in zip(predicted, kls, owner) if o == k]
            num, den = sum(p * d for p, d in pairs), sum(p * p for p, _ in pairs)
            if den > 0 and num > 0:
                ratio = min(max(num / den, 1 / refinement.clip), refinement.clip)
                factor[group] *= ratio
                corrected += 1
        current = solve_scaled()
        kl_now = probe.kl(current.assignments)
        rounds.append({"round": round_, "kl_at_start": at, "moves": len(moves), "groups_corrected": corrected,
                       "kl": kl_now, "bits_per_param": current.bits_per_param})
        if kl_now < best_kl:
            best, best_kl, best_round = current, kl_now, round_
    record = {
        "iterations": refinement.iterations, "objective_column": column, "windows": windows,
        "positions": probe.probe.positions, "kl_start": kl_start, "kl_best": best_kl, "chosen_round": best_round,
        "rounds": rounds, "decompositions": probe.decompositions, "kl_runs": probe.probe.runs,
        "seconds": time.perf_counter() - started,
        "factors": {m: float(f) for m, f in zip(matrices, factor) if f != 1.0},
    }
    return dataclasses.replace(best, extra={**best.extra, "refinement": record})
