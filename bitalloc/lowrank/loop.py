"""The alternating loop for one config: ``W ≈ Q + L1 @ L2``, and :func:`decompose`.

As in LQ-LoRA (Guo et al., ICLR 2024)::

    Q = 0;  repeat:  L1 @ L2 = best rank-r approximation of (W - Q);  Q = quantize(W - L1 @ L2)

with these differences (every knob in :class:`LoopPolicy`, what it buys in
``reports/profile_speed/``):

* the **best** iterate is returned (LQ-LoRA returns the last one, after the error rose);
* ``Q`` is quantized against the factors *as stored* (bf16-rounded or NF8-decoded), so every
  reported error is that of what is stored;
* the rank-r step (:mod:`bitalloc.lowrank.rank_step`) is over-relaxed with momentum for 3-8 bit
  codes; an over-relaxed step that raises the error is undone and retried shorter, never
  shorter than plain alternation; plain steps that rise go on from there;
* it stops when the best objective fell by less than the tolerance over the last
  ``patience`` steps and by less than ``stop_window`` times that over twice as many.

With a Fisher estimate ``F`` the rank-r step runs on ``D_r (W - Q) D_c`` with
``D_r = diag(sqrt(mean_cols F))``, ``D_c = diag(sqrt(mean_rows F))`` (LQ-LoRA's two-sided
heuristic) and maps the factors back; the objective, and so the best iterate and the stopping
rule, is then ``||sqrt(F) * (W - Q - L1 L2)||_F^2``. All work is in float32 on W's device;
errors are summed in float64. Inside the loop ``W - L1 L2 - Q`` comes from
:func:`bitalloc.quant.quantize_residual` (the same values, no bit packing); Q is packed only
when ``Decomposition.q`` is read.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from bitalloc.configs import QuantConfig
from bitalloc.lowrank.policy import ONE_CONFIG, LoopPolicy
from bitalloc.lowrank.rank_step import cold_factors, factors, orth, step_target, store
from bitalloc.lowrank.state import Decomposition, DeferredQ, Matrix, check_rank, minus_low
from bitalloc.quant import quantize, quantize_residual

log = logging.getLogger(__name__)

__all__ = ["decompose", "solve"]

@dataclass
class Iterate:
    """One point of the loop: the stored factors, Q's residual and the errors."""

    q: Any  # a DeferredQ
    target: torch.Tensor  # W - L1 @ L2 of the stored factors (what Q quantizes)
    resid: torch.Tensor  # W - L1 @ L2 - Q
    l1: torch.Tensor
    l2: torch.Tensor
    l1_q: Any
    l2_q: Any
    error: float
    error_fisher: float | None

    @property
    def objective(self) -> float:
        return self.error if self.error_fisher is None else self.error_fisher


def evaluate(m: Matrix, cfg: QuantConfig, L1: torch.Tensor, L2: torch.Tensor,
             target: torch.Tensor | None = None) -> Iterate:
    """Store the factors, quantize the rest against them, measure the error (``target``: a
    known ``W - L1 @ L2`` of the stored factors)."""
    s1, s2, q1, q2 = store(L1, L2, cfg)
    if target is None:
        target = minus_low(m.W, s1, s2)
    resid = quantize_residual(target, cfg, check=False)
    m.quantizations += 1
    err, errf = m.errors(resid)
    return Iterate(DeferredQ(m.W, s1, s2, cfg), target, resid, s1, s2, q1, q2, err, errf)


def converged(bests: list[float], tol: float, patience: int, window: float) -> bool:
    """Whether the best objective fell by less than ``tol`` (relative) over the last
    ``patience`` steps, and (``window`` > 0) by less than ``window x tol`` over twice as many."""
    then = bests[-1 - patience]
    if then - bests[-1] > tol * then:
        return False
    if window > 0:
        longer = bests[max(0, len(bests) - 1 - 2 * patience)]
        if longer - bests[-1] > window * tol * longer:
            return False
    return True


def solve(m: Matrix, cfg: QuantConfig, init: Any, policy: LoopPolicy, max_iters: int) -> Decomposition:
    """The alternating loop for one config from ``init`` (None: a cold start); the best iterate.

    ``max_iters == 0`` with an ``init`` just quantizes against the given factors.
    """
    check_rank(cfg, m.W)
    r = cfg.rank
    if r == 0:
        return _rank0(m, cfg)
    relax, momentum = policy.relax_momentum(cfg.bits)
    tol = policy.tolerance(cfg.bits)
    patience = policy.patience_for(cfg.bits, cfg.scale_bits)
    retreats = not policy.keeps_long_steps(cfg.bits, cfg.scale_bits)
    gen = m.generator()

    history: list[float] = []
    best = cur = prev = None  # prev: the iterate before cur, for momentum
    basis = None
    if init is not None:
        L1, L2, basis = _init_factors(init, m, r)
        cur = best = evaluate(m, cfg, L1, L2, m.target_of(init, cfg))
        history.append(cur.objective)
    bests = [] if best is None else [best.objective]
    eta, iters = relax, 0
    for _ in range(max_iters):
        if cur is None:
            L1, L2, basis = cold_factors(m, r, policy, gen)
        else:  # the rank-r step on L + eta (W - L - Q) (+ momentum): eta = 1 is plain alternation
            target = step_target(m.W, cur, prev if momentum else None, eta, momentum, policy)
            L1, L2, basis = factors(m, target, r, basis, policy, gen)
        iters += 1
        nxt = evaluate(m, cfg, L1, L2)
        history.append(nxt.objective)
        rose = cur is not None and nxt.objective > cur.objective
        if best is None or nxt.objective < best.objective:
            best = nxt
        bests.append(best.objective)
        if len(bests) > patience and converged(bests, tol, patience, policy.stop_window):
            break
        if rose and retreats and eta > 1.0:
            # an over-relaxed step made things worse: back to the best iterate, shorter steps,
            # never below plain alternation (under-relaxed steps crawl)
            eta = max(1.0, eta * 0.5)
            cur, prev = best, None
            continue
        # plain steps that rose go on from the new iterate (the landscape of NF2 codes and
        # coarse scales is noisy): the best iterate is kept and the stopping rule decides
        prev = None if cur is None or eta <= 1.0 else cur
        cur = nxt
    if best is None:
        raise ValueError("max_iters must be >= 1 without an init")
    log.debug("%s: %d iterations, objective %.6g", cfg.name, iters, best.objective)
    result = Decomposition(cfg, best.q, best.l1, best.l2, best.error, best.error_fisher, iters,
                           history, best.l1_q, best.l2_q, basis)
    m.last_target = (result, best.target) if cfg.lowrank_bits == 16 else None
    return result


def _init_factors(init: Any, m: Matrix, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(L1, L2, basis)`` of a warm start, trimmed to (or zero-padded up to) rank r."""
    basis = None
    if isinstance(init, Decomposition):
        L1, L2, basis = init.l1, init.l2, init.basis
    elif isinstance(init, (tuple, list)) and len(init) == 2:
        L1, L2 = init
    else:
        raise ValueError(f"init must be a Decomposition or a pair (L1, L2), got {type(init).__name__}")
    rows, cols = m.W.shape
    L1 = torch.as_tensor(L1).to(device=m.W.device, dtype=torch.float32)
    L2 = torch.as_tensor(L2).to(device=m.W.device, dtype=torch.float32)
    if L1.ndim != 2 or L2.ndim != 2 or L1.shape[0] != rows or L2.shape[1] != cols or L1.shape[1] != L2.shape[0]:
        raise ValueError(
            f"init factors of shapes {tuple(L1.shape)} and {tuple(L2.shape)} do not fit a {rows}x{cols} matrix"
        )
    k = L1.shape[1]
    if k >= r:
        L1, L2 = L1[:, :r], L2[:r]
    else:
        L1 = torch.cat([L1, L1.new_zeros(rows, r - k)], dim=1)
        L2 = torch.cat([L2, L2.new_zeros(r - k, cols)], dim=0)
    if basis is None and k > 0:
        basis = orth((L2.T if m.d_c is None else m.d_c.T * L2.T)[:, : min(k, r)])
    return L1.contiguous(), L2.contiguous(), basis


def _rank0(m: Matrix, cfg: QuantConfig) -> Decomposition:
    q = quantize(m.orig, cfg)
    m.quantizations += 1
    err, errf = m.errors(m.W - q.dequantize().float())
    rows, cols = m.W.shape
    return Decomposition(cfg, q, m.W.new_zeros(rows, 0), m.W.new_zeros(0, cols), err, errf, 0,
                         [errf if errf is not None else err])


@torch.no_grad()
def decompose(
    W: torch.Tensor,
    cfg: QuantConfig,
    fisher: torch.Tensor | None = None,
    *,
    init: Decomposition | tuple[torch.Tensor, torch.Tensor] | None = None,
    seed: int = 0,
    policy: LoopPolicy = ONE_CONFIG,
) -> Decomposition:
    """Decompose ``W ≈ Q + L1 @ L2`` for one config, on W's device; returns the best iterate.

    ``init`` (a Decomposition of a neighbouring config, or factors ``(L1, L2)``, trimmed to
    their first r components or zero-padded) starts from ``Q = quantize(W - L1 @ L2)`` instead
    of ``Q = 0``, and its subspace seeds the rank-r step; with an ``init``,
    ``policy.max_iters == 0`` just quantizes against it. ``seed`` seeds the random sketches.
    Raises ValueError for a non-finite W, a Fisher estimate of another shape or with negative
    entries, or a rank above ``min(rows, cols)``.
    """
    if not isinstance(policy, LoopPolicy):
        raise ValueError(f"policy must be a LoopPolicy, got {type(policy).__name__}")
    if policy.max_iters < (0 if init is not None else 1):
        raise ValueError(f"max_iters must be >= 1 (>= 0 with an init), got {policy.max_iters}")
    m = Matrix(W, fisher, seed, fisher_floor=policy.fisher_floor, tune_malloc=policy.keep_freed_memory)
    return solve(m, cfg, init, policy, policy.max_iters)
