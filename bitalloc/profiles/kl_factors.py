"""The profile's ``error_kl`` column: per-matrix KL factors, measured once and kept in the profile directory.

``error_kl = factor[matrix] · error_<basis>``, the factor fitted by
:func:`bitalloc.models.kl_probe.fit_kl_factors` (noise injected into that matrix alone, the
KL to the original measured at a few levels). The basis is ``error_act`` when the profile has
it, else ``error_fisher``, else ``error``. ``kl_factors.json`` holds the settings, the basis
and, per matrix, the factor with the probes it was fitted on: a rerun reuses every factor
measured with the same settings, so an interrupted measurement resumes, and ``error_kl`` can
be recomputed from the table and this file alone.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from bitalloc.atomic import atomic_write_json
from bitalloc.models.activations import InputMoments
from bitalloc.models.kl_probe import KLProbe, ProbeSettings, basis_error, fit_kl_factors

log = logging.getLogger(__name__)

KL_FACTORS_FILE = "kl_factors.json"
BASIS_COLUMNS = {"act": "error_act", "fisher": "error_fisher", "plain": "error"}
#: Matrices measured between two writes of ``kl_factors.json`` (the resume unit).
SAVE_EVERY = 16


def kl_basis(act: bool, fisher: bool) -> str:
    """The basis error of the KL factors: ``act`` when profiled, else ``fisher``, else ``plain``."""
    return "act" if act else ("fisher" if fisher else "plain")


def read_kl_factors(directory: str | Path) -> dict[str, Any] | None:
    """``kl_factors.json`` of a profile directory (None when absent or unreadable)."""
    path = Path(directory) / KL_FACTORS_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("factors"), dict) else None


def measure_kl_factors(directory: str | Path, model: torch.nn.Module, targets: Sequence[tuple[str, torch.nn.Module]],
                       names: Sequence[str], settings: ProbeSettings, basis: str, tokens: torch.Tensor, *,
                       moments: InputMoments | None = None, fisher: Mapping[str, torch.Tensor] | None = None,
                       device: str | torch.device | None = None, progress: bool = True) -> dict[str, float]:
    """The KL factor of each of ``names``, reusing those ``kl_factors.json`` holds for the same settings
    and basis and measuring the rest (on the first ``settings.windows`` rows of ``tokens``)."""
    if basis not in BASIS_COLUMNS:
        raise ValueError(f"unknown KL basis {basis!r}; use one of {', '.join(BASIS_COLUMNS)}")
    if basis == "act" and moments is None or basis == "fisher" and fisher is None:
        raise ValueError(f"KL factors on the {basis} basis need its estimate")
    directory = Path(directory)
    header = {"settings": settings.to_dict(), "basis": basis}
    kept = read_kl_factors(directory)
    entries: dict[str, Any] = {}
    if kept is not None and all(kept.get(k) == v for k, v in header.items()):
        entries = {n: e for n, e in kept["factors"].items() if isinstance(e, dict) and "factor" in e}
    todo = [n for n in names if n not in entries]
    seconds = float((kept or {}).get("seconds", 0.0)) if entries else 0.0
    if todo:
        if tokens.shape[0] < settings.windows:
            log.warning("KL probes: %d windows asked, %d calibration sequences available", settings.windows,
                        tokens.shape[0])

        def error(name: str, delta: torch.Tensor) -> float:
            if basis == "act":
                return basis_error(delta, H=moments.of(name))
            if basis == "fisher":
                return basis_error(delta, fisher=fisher[name])
            return basis_error(delta)

        started = time.perf_counter()
        probe = KLProbe(model, tokens[: settings.windows], targets, device=device)
        for s in range(0, len(todo), SAVE_EVERY):
            chunk = todo[s:s + SAVE_EVERY]
            entries.update(fit_kl_factors(probe, chunk, settings, error, progress=progress))
            elapsed = time.perf_counter() - started
            atomic_write_json(directory / KL_FACTORS_FILE,
                              {**header, "seconds": seconds + elapsed, "probes": len(entries) * len(settings.levels),
                               "factors": entries})
        log.info("KL factors of %d matrices measured in %.1f s", len(todo), time.perf_counter() - started)
    return {n: float(entries[n]["factor"]) for n in names}


def merge_kl_factors(sources: Sequence[str | Path], out: str | Path) -> bool:
    """Write the union of the sources' ``kl_factors.json`` to ``out`` (shards of one profile).

    Written only when every source has one and all were measured with the same settings and
    basis (what :func:`measure_kl_factors` needs to reuse them); otherwise nothing is written,
    with a warning when some source has factors. Returns whether the file was written.
    """
    kept = [read_kl_factors(src) for src in sources]
    if not any(kept):
        return False
    headers = [None if k is None else {"settings": k.get("settings"), "basis": k.get("basis")} for k in kept]
    if any(h is None for h in headers) or any(h != headers[0] for h in headers[1:]):
        log.warning("the shards' KL factors (%s) are not all measured with the same settings: %s not written; "
                    "error_kl keeps each shard's values", KL_FACTORS_FILE, KL_FACTORS_FILE)
        return False
    factors: dict[str, Any] = {}
    for k in kept:
        factors.update(k["factors"])
    atomic_write_json(Path(out) / KL_FACTORS_FILE,
                      {**headers[0], "seconds": sum(float(k.get("seconds", 0.0)) for k in kept),
                       "probes": sum(int(k.get("probes", 0)) for k in kept), "factors": factors})
    return True


def add_error_kl(table: pd.DataFrame, factors: Mapping[str, float], basis: str) -> pd.DataFrame:
    """``table`` with ``error_kl = factor[matrix] · error_<basis>`` (NaN for a matrix without a factor)."""
    column = BASIS_COLUMNS[basis]
    factor = table["matrix"].map(lambda n: factors.get(n, math.nan)).astype("float64")
    return table.assign(error_kl=factor * pd.to_numeric(table[column], errors="coerce"))
