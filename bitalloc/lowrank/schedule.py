"""Many configs of one matrix (:func:`decompose_many`): who starts from whom, and the repairs.

Configs are grouped by their codes (family, bits, block); each config's Q is its family's
quantizer (:func:`bitalloc.quant.quantize_residual` dispatches on ``cfg.family``). In each group the *leader* (highest rank,
bf16 factors, most precise block scales; for codes in ``policy.coarse_first`` the least
precise) runs the loop from a cold start. The others follow in order of scale precision, each fp16 twin right after its
fp32 sibling, each warm-started from the nearest config solved before it (:func:`warm_plan`).
Then the repair pass re-solves configs that ended above a config with coarser scales.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Sequence

import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank.loop import solve
from bitalloc.lowrank.policy import MANY_CONFIGS, LoopPolicy
from bitalloc.lowrank.state import Decomposition, Matrix, check_rank

log = logging.getLogger(__name__)

__all__ = ["decompose_many", "warm_plan", "is_twin", "coarser_scales", "same_quantizer"]


@functools.lru_cache(maxsize=1 << 16)  # pairs of configs, asked again for every matrix
def is_twin(a: QuantConfig, b: QuantConfig) -> bool:
    """Same config up to the dtype of the second-level scales (their Q are nearly identical)."""
    return a.scale_bits != 16 and a != b and a.replace(scale_dtype=b.scale_dtype) == b


@functools.lru_cache(maxsize=1 << 16)
def same_quantizer(a: QuantConfig, b: QuantConfig) -> bool:
    """Same Q (codes, blocks, scales), maybe another rank or factor storage."""
    return a.replace(rank=b.rank, lowrank_bits=b.lowrank_bits) == b


@functools.lru_cache(maxsize=1 << 16)
def coarser_scales(p: QuantConfig, c: QuantConfig) -> bool:
    """Whether ``p`` is ``c`` with scales no more precise (fewer or equal scale bits, equal or
    larger scale groups; the dtype of the second-level scales is not compared), p != c."""
    return (
        p != c
        and p.replace(scale_bits=c.scale_bits, scale_block=c.scale_block, scale_dtype=c.scale_dtype) == c
        and p.scale_bits <= c.scale_bits
        and p.scale_block >= c.scale_block
    )


def _scale_precision(cfg: QuantConfig) -> tuple[int, int, int]:
    """Larger = more precise block scales (more scale bits, smaller groups, then fp32 over fp16:
    the dtype comes last, so that each fp16 twin is solved right after its fp32 sibling)."""
    return (cfg.scale_bits, -cfg.scale_block, 32 if cfg.scale_dtype == "fp32" else 16)


def _parent_distance(c: QuantConfig, p: QuantConfig) -> tuple[float, ...]:
    """How far a solved config ``p`` (same bits and block) is from ``c`` as a warm start."""
    return (
        0 if same_quantizer(c, p) and p.rank >= c.rank else 1,
        0 if is_twin(c, p) else 1,
        0 if p.rank >= c.rank else 1,
        abs(p.rank - c.rank),
        abs(math.log2(p.scale_bits) - math.log2(c.scale_bits)),
        abs(math.log2(p.scale_block) - math.log2(c.scale_block)),
        int(p.scale_dtype != c.scale_dtype),
        int(p.lowrank_bits != c.lowrank_bits),
    )


def warm_plan(cfg: QuantConfig, parent: Decomposition | None, policy: LoopPolicy) -> tuple[Decomposition | None, int]:
    """Whether (and for how many steps) ``cfg`` starts from ``parent``; None = a cold start.

    The same quantizer at another rank or factor storage starts from the parent's (trimmed)
    factors; an fp16/fp32 twin takes ``policy.twin_iters`` steps from its sibling's factors;
    configs with ``policy.cold_scale_bits`` (outside ``policy.coarse_first``) start cold
    rather than from another config's optimum; the rest start from the parent.
    """
    if parent is None:
        return None, policy.max_iters
    if same_quantizer(cfg, parent.cfg):
        return parent, policy.max_iters
    if is_twin(cfg, parent.cfg):
        return parent, policy.twin_iters
    if cfg.bits not in policy.coarse_first and cfg.scale_bits in policy.cold_scale_bits:
        return None, policy.max_iters
    return parent, policy.max_iters


def _repair(m: Matrix, cfgs: list[QuantConfig], order: list[int], out: list, policy: LoopPolicy) -> None:
    """Re-solve each config that ended above a config with coarser scales, from its factors.

    Coarse scales clip many weights, and the descent from a finer config's optimum can stall
    well above what the coarser config reached. Only configs that ``policy.repairs`` are
    re-solved, and only when the coarser config ended ``policy.repair_margin`` lower. Configs
    are visited from the coarsest up, so a repaired config can in turn repair finer ones; the
    new result is kept only if it is lower.
    """
    for i in reversed(order):
        cfg, cur = cfgs[i], out[i]
        if not policy.repairs(cfg.bits, cfg.scale_bits):
            continue
        margin = policy.repair_margin[cfg.bits]
        lower = [out[j] for j in order
                 if j != i and coarser_scales(cfgs[j], cfg) and out[j].objective < (1 - margin) * cur.objective]
        if not lower:
            continue
        start = min(lower, key=lambda d: d.objective)
        d = solve(m, cfg, start, policy, policy.max_iters)
        if d.objective < cur.objective:
            log.debug("%s repaired from %s: %.6g -> %.6g", cfg.name, start.cfg.name, cur.objective, d.objective)
            out[i] = d


@torch.no_grad()
def decompose_many(
    W: torch.Tensor,
    cfgs: Sequence[QuantConfig],
    fisher: torch.Tensor | None = None,
    *,
    seed: int = 0,
    policy: LoopPolicy = MANY_CONFIGS,
) -> list[Decomposition]:
    """Decompose one matrix for many configs, sharing work; results in the order of ``cfgs``.

    See the module docstring for the schedule. Every cold start shares one first step, the
    top-r part of W. With ``policy.share`` False every config is solved alone from a cold
    start, exactly as :func:`bitalloc.lowrank.decompose` does with the same policy.
    """
    if not isinstance(policy, LoopPolicy):
        raise ValueError(f"policy must be a LoopPolicy, got {type(policy).__name__}")
    if policy.max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {policy.max_iters}")
    cfgs = list(cfgs)
    m = Matrix(W, fisher, seed, fisher_floor=policy.fisher_floor, tune_malloc=policy.keep_freed_memory)
    for cfg in cfgs:
        check_rank(cfg, m.W)
    out: list[Decomposition | None] = [None] * len(cfgs)
    groups: dict[tuple[str, int, int], list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.rank == 0 or not policy.share:
            out[i] = solve(m, cfg, None, policy, policy.max_iters)
        else:
            groups.setdefault((cfg.family, cfg.bits, cfg.block), []).append(i)
    for (_, bits, _), members in sorted(groups.items()):
        sign = -1 if bits in policy.coarse_first else 1
        order = sorted(
            members,
            key=lambda i: (cfgs[i].rank, cfgs[i].lowrank_bits, tuple(sign * x for x in _scale_precision(cfgs[i]))),
            reverse=True,
        )
        solved: list[Decomposition] = []
        for i in order:  # the first, the leader, from a cold start
            cfg = cfgs[i]
            parent = min(solved, key=lambda p: _parent_distance(cfg, p.cfg)) if solved else None
            start, iters = warm_plan(cfg, parent, policy)
            d = solve(m, cfg, start, policy, iters)
            out[i] = d
            solved.append(d)
        _repair(m, cfgs, order, out, policy)
    # the work done, for benchmarks: ``record.quantizations`` of this record
    log.debug("decompose_many: %d configs of a %dx%d matrix, %d quantizations", len(cfgs), *m.W.shape,
              m.quantizations, extra={"quantizations": m.quantizations})
    return [d for d in out if d is not None]
