"""Compiled CPU kernels (numba) for the hot path of the decomposition loop: NF rounding.

``W -> nf_round(W / s) * s`` (and ``W`` minus that) for float32 blocks whose scales ``s`` are
already known, in one pass per row instead of about ten tensor passes. Each kernel runs the
same float32 operations as the tensor code in :mod:`bitalloc.quant.blockwise` and
:mod:`bitalloc.quant.nf`, in the same order, so the results are bit-identical (tested):

* ``y = w / s`` (``y = 0`` where ``s`` is 0), IEEE division as ``torch.div``;
* 2-4 bit codes: the level is the last one whose midpoint is below ``y`` (the rule of
  ``torch.bucketize``), found by comparing ``y`` with each midpoint in turn, which compiles
  to vector compares and blends (no table lookup, which does not vectorize);
* wider codes: the lookup table of :func:`bitalloc.quant.nf.nf_round` (bin, then the level
  below or above its midpoint, picked by index arithmetic rather than a branch);
* the value is ``level * s``, the residual ``w - level * s``.

numba is optional: without it (or with ``BITALLOC_NO_NUMBA=1``) :func:`available` is False
and callers use the tensor code. Kernels compile on first use and are cached on disk
(numba's ``cache=True``), so later processes start at once.
"""

from __future__ import annotations

import functools
import logging
import os
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from bitalloc.quant import nf

log = logging.getLogger(__name__)

#: Codebooks with at most this many midpoints are rounded by compare-and-blend (NF2-NF4);
#: wider ones (NF8: 255 midpoints) by the lookup table.
MAX_CHAIN_MIDPOINTS = 15


def available() -> bool:
    """Whether the compiled kernels can be used (numba importable, not disabled by env)."""
    return os.environ.get("BITALLOC_NO_NUMBA", "") in ("", "0") and _compiled() is not None


def applies(x: torch.Tensor) -> bool:
    """Whether the kernels serve ``x``: a float32 tensor on the CPU, and :func:`available`."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and available()


@functools.lru_cache(maxsize=None)
def _compiled() -> SimpleNamespace | None:
    """The jitted kernels (numba imported on first use: it adds 0.2 s to start-up), or None."""
    try:
        import numba
    except Exception:  # numba is a dependency, but the tensor code must work without it
        return None
    for cache in (True, False):
        try:
            return _build(numba, cache)
        except Exception as exc:  # e.g. no writable cache directory for numba's disk cache
            log.warning("numba kernels (cache=%s) unavailable: %s", cache, exc)
    return None


def _build(numba: Any, cache: bool) -> SimpleNamespace:
    """Define the kernels (compiled on first call; with ``cache``, kept on disk by numba)."""
    opt = dict(boundscheck=False, error_model="numpy", nogil=True, cache=cache)

    @numba.njit(**opt)
    def round_chain(t, sc, levels, mids, residual, out):  # pragma: no cover - compiled
        rows, cols = t.shape
        zero = np.float32(0.0)
        y = np.empty(cols, np.float32)
        q = np.empty(cols, np.float32)
        first = levels[0]
        for i in range(rows):
            for j in range(cols):
                s = sc[i, j]
                v = t[i, j] / s
                y[j] = v if s > zero else zero
                q[j] = first
            for m in range(mids.size):
                mid = mids[m]
                level = levels[m + 1]
                for j in range(cols):
                    q[j] = level if y[j] > mid else q[j]
            if residual:
                for j in range(cols):
                    out[i, j] = t[i, j] - q[j] * sc[i, j]
            else:
                for j in range(cols):
                    out[i, j] = q[j] * sc[i, j]

    @numba.njit(**opt)
    def round_table(t, sc, pairs, threshold, half, top, residual, out):  # pragma: no cover
        # pairs[2 k], pairs[2 k + 1]: the levels below and above bin k's midpoint. The level is
        # picked by index arithmetic, not a branch: a branch on ``y > threshold`` mispredicts
        # wherever bins hold midpoints (1.4x slower, measured on SmolLM2's 1536 x 576 matrices)
        rows, cols = t.shape
        zero = np.float32(0.0)
        y = np.empty(cols, np.float32)
        bins = np.empty(cols, np.int32)
        for i in range(rows):
            for j in range(cols):
                s = sc[i, j]
                v = t[i, j] / s
                v = v if s > zero else zero
                y[j] = v
                bins[j] = np.int32(min(max(v * half + half, zero), top))
            if residual:
                for j in range(cols):
                    k = bins[j]
                    out[i, j] = t[i, j] - pairs[2 * k + np.int32(y[j] > threshold[k])] * sc[i, j]
            else:
                for j in range(cols):
                    k = bins[j]
                    out[i, j] = pairs[2 * k + np.int32(y[j] > threshold[k])] * sc[i, j]

    # reassociation only: the sum may be split into vector lanes; each square stays float32
    @numba.njit(fastmath={"reassoc"}, **opt)
    def sum_squares(x):  # pragma: no cover - compiled
        total = 0.0
        for i in range(x.size):
            v = x[i]
            total += np.float64(v * v)
        return total

    # no NaN/inf/signed-zero care: lets the max vectorize; exact for the finite input it gets
    @numba.njit(fastmath={"nnan", "ninf", "nsz"}, **opt)
    def block_absmax(w, block, out):  # pragma: no cover - compiled
        rows, cols = w.shape
        blocks = out.shape[1]
        full = cols // block  # blocks of exactly ``block`` weights: a constant trip count
        for i in range(rows):
            for b in range(full):
                base = b * block
                m = np.float32(0.0)
                for j in range(block):
                    m = max(m, abs(w[i, base + j]))
                out[i, b] = m
            for b in range(full, blocks):  # the short last block, if any
                m = np.float32(0.0)
                for j in range(b * block, cols):
                    m = max(m, abs(w[i, j]))
                out[i, b] = m

    return SimpleNamespace(
        round_chain=round_chain, round_table=round_table, sum_squares=sum_squares,
        block_absmax=block_absmax,
    )


def round_to_levels(
    t: torch.Tensor, scales: torch.Tensor, bits: int, *, residual: bool = False
) -> torch.Tensor:
    """``nf_round(t / scales, bits) * scales`` (``t`` minus that with ``residual``), one pass.

    ``t`` is a contiguous float32 CPU matrix and ``scales`` its per-element scales (the block
    scales expanded to ``t``'s shape, contiguous); bit-identical to the tensor code.
    """
    k = _compiled()
    out = torch.empty_like(t)
    tn, sn, on = t.numpy(), scales.numpy(), out.numpy()
    levels, mids = nf._cached(bits, "cpu")
    table = _table_pairs(bits) if mids.numel() > MAX_CHAIN_MIDPOINTS else None
    if table is None:
        k.round_chain(tn, sn, levels.numpy(), mids.numpy(), residual, on)
        return out
    half = np.float32(nf._LUT_BINS // 2)
    top = np.float32(nf._LUT_BINS - 1)
    k.round_table(tn, sn, *table, half, top, residual, on)
    return out


@functools.lru_cache(maxsize=None)
def _table_pairs(bits: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The lookup table of :func:`bitalloc.quant.nf.round_tables` for the kernel: the levels
    below and above each bin's midpoint interleaved (``pairs[2 k + (y > threshold[k])]``), and
    the thresholds; None when the codebook has no table."""
    tables = nf.round_tables(bits)
    if tables is None:
        return None
    below, above, threshold = tables
    pairs = np.empty(2 * below.numel(), np.float32)
    pairs[0::2], pairs[1::2] = below.numpy(), above.numpy()
    return pairs, threshold.numpy()


def block_absmax(W: torch.Tensor, block: int) -> torch.Tensor:
    """``max |w|`` of each block of ``block`` consecutive weights along a row (the last block
    of a row may be short), (rows, blocks per row); ``W`` contiguous float32 on the CPU, finite."""
    rows, cols = W.shape
    out = torch.empty(rows, -(-cols // block), dtype=torch.float32)
    _compiled().block_absmax(W.numpy(), block, out.numpy())
    return out


def sum_squares(x: torch.Tensor) -> float:
    """``float((x * x).sum(dtype=float64))`` for a contiguous float32 CPU tensor (each square
    rounded to float32 as there, summed in float64 in another order: equal to ~1e-15)."""
    return float(_compiled().sum_squares(x.reshape(-1).numpy()))
