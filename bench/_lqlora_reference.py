"""A faithful re-implementation of LQ-LoRA's decomposition loop, for benchmarks and tests only.

This mirrors the *procedure* of LQ-LoRA's public code (Guo et al., ICLR 2024,
``lowrank_quantized_sparse_decomposition``) as described in the paper and that code; it is
written from that description, not copied. For one matrix ``W`` and one config, independently
of every other matrix and config:

1. cold start: ``Q = 0``, ``last_error = inf``;
2. up to 100 times:
   a. ``U, S, V = torch.svd_lowrank(W - Q, q=r + 10, niter=2)`` (randomized SVD, a sketch of
      r + 10 columns, 2 power iterations, a fresh random sketch every time), truncated to the
      top r; ``L1 = U sqrt(S)``, ``L2 = sqrt(S) V^T``. With a Fisher matrix ``F`` the SVD runs
      on ``d_r * (W - Q) * d_c`` with ``d_r = sqrt(mean_cols F)``, ``d_c = sqrt(mean_rows F)``
      ("two-sided" heuristic) and the factors are divided back;
   b. ``Q = quantize(W - L1 @ L2)`` (through ``bitalloc.quant.quantize_dequantize``, which is
      bit for bit ``quantize(...).dequantize()`` without packing: the loop needs only the
      values, and so the reference gets the same fast quantizer as bitalloc, input check
      skipped as in bitalloc's loop);
   c. ``error = ||W - (L1 @ L2 + Q)||_F`` (``||sqrt(F) * (...)||_F`` with F);
   d. if ``error > last_error``: stop; else ``last_error = error``;
3. return the **last** ``(L1, L2, Q)``: the iterate whose error went up (LQ-LoRA's code notes
   this as a TODO), or the 100th.

LQ-LoRA keeps the factors in full precision while iterating and when it reports the error. A
bitalloc config stores them (bf16, or NF8 with ``lowrank_bits == 8``), so besides that
in-loop number (``error_unstored``) this module reports ``error``: the same returned Q with the
factors rounded as the config stores them. ``error`` is what bitalloc's numbers are compared
with (same stored format); both are recorded. The global torch RNG is seeded per call
(``seed``) because ``torch.svd_lowrank`` draws from it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitalloc.configs import LOWRANK_NF8, QuantConfig


@dataclass
class ReferenceResult:
    """What the reference procedure returns for one (matrix, config)."""

    l1: torch.Tensor
    l2: torch.Tensor
    q: torch.Tensor  # dequantized Q
    error: float  # ||W - Q - L1 L2||^2 with factors as the config stores them
    error_unstored: float  # the same with full-precision factors (LQ-LoRA's number)
    error_fisher: float | None
    iterations: int
    best_error: float  # bookkeeping only: the stored error of the best in-loop iterate


def _store_factors(l1: torch.Tensor, l2: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from bitalloc.quant import quantize

    if cfg.lowrank_bits == 16:
        return l1.bfloat16().float(), l2.bfloat16().float()
    return (
        quantize(l1.T.contiguous(), LOWRANK_NF8).dequantize().float().T,
        quantize(l2.contiguous(), LOWRANK_NF8).dequantize().float(),
    )


def _sq(x: torch.Tensor) -> float:
    return float((x * x).sum(dtype=torch.float64))


@torch.no_grad()
def lqlora_reference(
    W: torch.Tensor,
    cfg: QuantConfig,
    fisher: torch.Tensor | None = None,
    *,
    max_iters: int = 100,
    oversample: int = 10,
    niter: int = 2,
    seed: int = 0,
) -> ReferenceResult:
    """Run LQ-LoRA's loop (cold start, randomized SVD, stop at the first rise, keep the last)."""
    from bitalloc.quant import quantize, quantize_dequantize

    torch.manual_seed(seed)
    A = W.float()
    r = cfg.rank
    if r == 0:
        q = quantize(W, cfg).dequantize().float()
        err = _sq(A - q)
        errf = None if fisher is None else _sq(fisher.float().sqrt() * (A - q))
        empty1, empty2 = A.new_zeros(A.shape[0], 0), A.new_zeros(0, A.shape[1])
        return ReferenceResult(empty1, empty2, q, err, err, errf, 0, err)
    if fisher is not None:
        F = fisher.float()
        d_r = F.mean(dim=1, keepdim=True).sqrt()
        d_c = F.mean(dim=0, keepdim=True).sqrt()
    Q = torch.zeros_like(A)
    last_error = float("inf")
    best = (float("inf"), None, None, None)  # not used by the procedure; for the report only
    it = 0
    for it in range(1, max_iters + 1):
        R = A - Q
        if fisher is not None:
            R = d_r * R * d_c
        U, S, V = torch.svd_lowrank(R, q=min(r + oversample, *R.shape), niter=niter)
        s = S[:r].sqrt()
        L1 = U[:, :r] * s
        L2 = (V[:, :r] * s).T
        if fisher is not None:
            L1 = L1 / d_r
            L2 = L2 / d_c
        Q = quantize_dequantize(A - L1 @ L2, cfg, check=False).float()
        E = A - L1 @ L2 - Q
        error = (_sq(F.sqrt() * E) if fisher is not None else _sq(E)) ** 0.5
        if error < best[0]:
            best = (error, L1, L2, Q)
        if error > last_error:
            break
        last_error = error
    s1, s2 = _store_factors(L1, L2, cfg)
    E_stored = A - s1 @ s2 - Q
    err_fisher = None if fisher is None else _sq(F.sqrt() * E_stored)
    b1, b2 = _store_factors(best[1], best[2], cfg)
    best_error = _sq(A - b1 @ b2 - best[3])
    return ReferenceResult(L1, L2, Q, _sq(E_stored), _sq(E), err_fisher, it, best_error)


if __name__ == "__main__":  # `make bench` runs every bench/*.py; this one is a library.
    pass
