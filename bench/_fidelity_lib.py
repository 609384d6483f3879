"""Pieces of ``bench/objective_fidelity.py`` that need no model run: rank correlation, the
objectives' predicted totals, perturbed allocations, evaluation windows kept apart from the
calibration text, and the one-pass perplexity + KL score against cached reference log-probs."""

from __future__ import annotations

import hashlib
import json
import math
import random
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

#: Objective names (as ``solve --objective`` takes them) and the profile columns they read.
OBJECTIVES = {"plain": "error", "fisher": "error_fisher", "act": "error_act", "kl": "error_kl"}

#: Positions scored at a time (a 49k vocabulary in float32 stays small).
POSITION_CHUNK = 256


# ----- statistics ----------------------------------------------------------------------------------
def average_ranks(values: Sequence[float]) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing the mean of their ranks."""
    x = np.asarray(values, dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    i = 0
    while i < len(x):
        j = i
        while j + 1 < len(x) and x[order[j + 1]] == x[order[i]]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman's rank correlation (Pearson on average ranks); None for fewer than 3 pairs or a
    constant side. Pairs with a non-finite member are left out."""
    a = np.asarray(x, dtype=np.float64)
    b = np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"spearman needs two sequences of one length, got {a.shape} and {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    if len(a) < 3:
        return None
    ra, rb = average_ranks(a), average_ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = math.sqrt(float((ra * ra).sum() * (rb * rb).sum()))
    return None if den == 0 else float((ra * rb).sum() / den)


# ----- profile tables and allocations ----------------------------------------------------------------
def available_objectives(df: pd.DataFrame) -> dict[str, str | None]:
    """Each objective's column when the profile has it with numbers, else None."""
    out: dict[str, str | None] = {}
    for name, column in OBJECTIVES.items():
        ok = column in df.columns and pd.to_numeric(df[column], errors="coerce").notna().any()
        out[name] = column if ok else None
    return out


def lookup(df: pd.DataFrame) -> pd.DataFrame:
    """The table indexed by (matrix, config)."""
    return df.set_index(["matrix", "config"]).sort_index()


def totals(table: pd.DataFrame, assignments: Mapping[str, str], columns: Sequence[str]) -> dict[str, float]:
    """Σ over matrices of each column at the assigned config (``table`` from :func:`lookup`),
    and ``bits_per_param``: Σ storage_bits / Σ rows·cols."""
    rows = table.loc[list(assignments.items())]
    out = {c: float(pd.to_numeric(rows[c], errors="coerce").sum(min_count=len(rows))) for c in columns}
    out["bits_per_param"] = float(rows["storage_bits"].sum() / (rows["rows"] * rows["cols"]).sum())
    return out


def digest(assignments: Mapping[str, str]) -> str:
    """A short content hash of an assignment map (the cache key of its measurement)."""
    text = json.dumps(sorted(assignments.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def move_ladders(df: pd.DataFrame, columns: Sequence[str]) -> dict[str, list[str]]:
    """Per matrix, the configs a solver could choose (not dominated within the matrix under at
    least one of ``columns``), ordered by storage bits: the steps of a one-config move."""
    ladders: dict[str, list[str]] = {}
    for matrix, group in df.groupby("matrix", sort=False):
        keep: set[str] = set()
        g = group.sort_values("storage_bits", kind="mergesort")
        for column in columns:
            best = math.inf
            for cfg, err in zip(g["config"], pd.to_numeric(g[column], errors="coerce")):
                if np.isfinite(err) and err < best:
                    keep.add(cfg)
                    best = err
        ladders[str(matrix)] = [c for c in g["config"] if c in keep]
    return ladders


def perturb(assignments: Mapping[str, str], ladders: Mapping[str, list[str]], table: pd.DataFrame,
            rng: random.Random, *, moves: int, target_bits: float, tolerance: float,
            attempts: int = 200) -> dict[str, str]:
    """``assignments`` with ``moves`` matrices moved one step up or down their ladder, at random,
    within ``tolerance`` bits/param of ``target_bits`` (the closest of ``attempts`` tries if none is)."""
    names = [m for m in assignments if len(ladders.get(m, ())) > 1]
    if not names:
        raise ValueError("no matrix has more than one config to move to")
    params = {m: float(table.loc[(m, assignments[m]), "rows"] * table.loc[(m, assignments[m]), "cols"])
              for m in assignments}
    total_params = sum(params.values())
    bits = {key: float(v) for key, v in table["storage_bits"].items()}
    base = sum(bits[(m, c)] for m, c in assignments.items())
    best: tuple[float, dict[str, str]] | None = None
    for _ in range(attempts):
        new = dict(assignments)
        stored = base
        for m in rng.sample(names, min(moves, len(names))):
            ladder = ladders[m]
            i = ladder.index(new[m]) if new[m] in ladder else min(
                range(len(ladder)), key=lambda k: abs(bits[(m, ladder[k])] - bits[(m, new[m])]))
            step = rng.choice((-1, 1))
            j = min(max(i + step, 0), len(ladder) - 1)
            if j == i:
                j = i - step if 0 <= i - step < len(ladder) else i
            stored += bits[(m, ladder[j])] - bits[(m, new[m])]
            new[m] = ladder[j]
        off = abs(stored / total_params - target_bits)
        if new != dict(assignments) and (best is None or off < best[0]):
            best = (off, new)
        if best is not None and best[0] <= tolerance:
            break
    if best is None:
        raise ValueError("no perturbation changes the allocation")
    return best[1]


# ----- evaluation windows ---------------------------------------------------------------------------
def calibration_spans(calibration: Mapping[str, Any] | None, data: str, n_tokens: int) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of ``data``'s token stream that a profile's calibration read.

    ``calibration`` is the profile's ``meta.json`` entry (``source``, ``samples``, ``seqlen``);
    a source other than ``data`` (``self:N`` text, another file) reads none of it. The spans
    follow :func:`bitalloc.models.text.calibration_tokens` (windows spread evenly over the text).
    """
    from bitalloc.models.text import spread_indices

    if not calibration or str(calibration.get("source", "")).strip().lower() != str(data).strip().lower():
        return []
    seqlen, samples = int(calibration["seqlen"]), int(calibration["samples"])
    available = n_tokens // seqlen
    return [(int(i) * seqlen, (int(i) + 1) * seqlen) for i in spread_indices(available, samples)]


def disjoint_windows(ids: torch.Tensor, seqlen: int, n: int, avoid: Sequence[tuple[int, int]],
                     ) -> tuple[torch.LongTensor, list[int]]:
    """``n`` windows of ``seqlen`` tokens from the 1-D token stream ``ids``, spread evenly over
    the windows that share no token with the ``avoid`` spans; with their start offsets."""
    free = [s for s in range(0, ids.numel() - seqlen + 1, seqlen)
            if all(s + seqlen <= a or s >= b for a, b in avoid)]
    if len(free) < n:
        raise ValueError(f"only {len(free)} windows of {seqlen} tokens avoid the calibration text; asked for {n}")
    starts = [free[(k * len(free)) // n] for k in range(n)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).long(), starts


# ----- one forward pass: perplexity and KL -------------------------------------------------------------
@torch.inference_mode()
def reference_logprobs(model: torch.nn.Module, windows: torch.Tensor) -> list[torch.Tensor]:
    """The reference model's next-token log-probabilities per window (float32, [seqlen, vocab])."""
    model.eval()
    return [F.log_softmax(model(input_ids=w[None], use_cache=False).logits[0].float(), dim=-1) for w in windows]


@torch.inference_mode()
def score(model: torch.nn.Module, windows: torch.Tensor, reference: Sequence[torch.Tensor]) -> dict[str, float]:
    """Perplexity (GPTQ convention) and mean per-position ``KL(P_reference || P_model)`` in one
    forward pass per window; the same numbers as ``bitalloc.models.evaluate``'s ``perplexity``
    and ``kl_divergence``."""
    model.eval()
    nll = kl = 0.0
    tokens = positions = 0
    for w, ref in zip(windows, reference):
        logits = model(input_ids=w[None], use_cache=False).logits[0]
        for start in range(0, logits.shape[0], POSITION_CHUNK):
            log_p = F.log_softmax(logits[start : start + POSITION_CHUNK].float(), dim=-1)
            kl += F.kl_div(log_p, ref[start : start + POSITION_CHUNK], log_target=True, reduction="sum").item()
            labels = w[start + 1 : start + POSITION_CHUNK + 1]
            nll -= log_p[: labels.numel()].gather(1, labels[:, None]).sum().item()
        tokens += w.numel() - 1
        positions += w.numel()
    mean = nll / tokens
    return {"perplexity": math.exp(mean) if mean < 700 else math.inf, "nll": mean, "kl": kl / positions}


# ----- in-memory substitution -------------------------------------------------------------------------
class Substitution:
    """A loaded model whose target weights are replaced in place by ``Q`` of a config, computed as
    ``bitalloc apply`` computes it (the same ``decompose`` call: weight, config, the profile's
    Fisher estimate, seed ``seed * 100003 + target index``) and kept for reuse across allocations.

    Only rank-0 configs (``Q`` alone, no adapter) are substituted; :meth:`supports` says whether
    an allocation qualifies. :meth:`max_difference` compares with a model ``bitalloc.load`` loaded.
    """

    def __init__(self, model: torch.nn.Module, targets: Sequence[tuple[str, torch.nn.Module]],
                 fisher: Mapping[str, torch.Tensor] | None, seed: int = 0) -> None:
        from bitalloc.models.targets import float_target_weight

        self.model = model
        self.modules = dict(targets)
        self.index = {name: i for i, (name, _) in enumerate(targets)}
        self.original = {name: float_target_weight(name, m, "cpu").clone() for name, m in targets}
        self.fisher = fisher
        self.seed = seed
        self.cache: dict[tuple[str, str], torch.Tensor] = {}
        self.installed: dict[str, str] = {}

    @staticmethod
    def supports(assignments: Mapping[str, str]) -> bool:
        """Whether every config of ``assignments`` has rank 0."""
        from bitalloc.configs import QuantConfig

        return all(QuantConfig.from_name(c, allow_unusual=True).rank == 0 for c in set(assignments.values()))

    def weight(self, name: str, config: str) -> torch.Tensor:
        """``Q`` of target ``name`` under ``config`` (float32, the weight's shape)."""
        from bitalloc.configs import QuantConfig
        from bitalloc.lowrank import decompose

        key = (name, config)
        if key not in self.cache:
            F_ = None if self.fisher is None else self.fisher[name]
            dec = decompose(self.original[name], QuantConfig.from_name(config, allow_unusual=True), F_,
                            seed=self.seed * 100003 + self.index[name])
            self.cache[key] = dec.q.dequantize().float()
        return self.cache[key]

    def install(self, assignments: Mapping[str, str]) -> None:
        """Put each target's ``Q`` in place (targets already holding their config are left as they are)."""
        from bitalloc.models.targets import set_target_weight

        for name, config in assignments.items():
            if self.installed.get(name) != config:
                set_target_weight(self.modules[name], self.weight(name, config))
                self.installed[name] = config

    def max_difference(self, loaded: torch.nn.Module) -> float:
        """Largest absolute difference between the installed weights and those of ``loaded``."""
        modules = dict(loaded.named_modules())
        worst = 0.0
        for name in self.installed:
            other = modules[name]
            w = other.dequantized_weight(torch.float32) if hasattr(other, "dequantized_weight") else other.weight
            worst = max(worst, float((w.float() - self.weight(name, self.installed[name])).abs().max()))
        return worst
