"""The LQ-LoRA decomposition ``W ≈ Q + L1 @ L2`` (plain and Fisher-weighted).

``Q`` is ``bitalloc.quant.quantize``'d with the config's NF codes and (double-quantized)
block scales; ``L1`` (rows x r) and ``L2`` (r x cols) are a rank-r factorization stored as the
config says (bf16, or NF8 with ``lowrank_bits == 8``). The two are found by alternating
minimization, as in LQ-LoRA (Guo et al., ICLR 2024):

    Q0 = 0;  repeat:  L1 @ L2 = best rank-r approximation of (W - Q);  Q = quantize(W - L1 @ L2)

with these differences from LQ-LoRA's code (each measured in ``bench/profile_speed.py``):

* the **best** iterate seen is returned (LQ-LoRA returns the last one, after the error rose);
* ``Q`` is quantized against the factors *as stored* (bf16-rounded or NF8-decoded), so the
  rounding of the factors is absorbed by ``Q`` and every reported error is that of what is
  stored;
* the first rank-r step of a cold start, the top-r part of W, is an exact SVD (an accurate
  subspace iteration on large matrices) computed once per matrix and shared by every
  config, and the second step sketches afresh with power
  iterations: with these, NF2 errors end about 3% lower than with LQ-LoRA's randomized
  steps (the early steps choose the basin; more accurate later steps did not help);
* the rank-r step is a subspace iteration that reuses the previous iterate's right singular
  subspace (one pass instead of a fresh random sketch with two power iterations; the pass
  orthonormalized through a Cholesky factor of its Gram matrix and the small SVD through the
  float64 eigendecomposition of a k x k Gram matrix), an exact SVD where that is cheaper
  (small matrices, or a rank near the smaller side);
* on matrices of 2^18+ entries the step's target stays split (:data:`LOWP_RESIDUAL`): its
  low-rank terms as float32 factors, and ``W - L - Q`` multiplied in bfloat16 with float32
  sums, so only the step's correction is rounded (6-11% less time on 14 SmolLM2 matrices, the same
  errors within the run-to-run noise);
* for 3-8 bit codes the step is over-relaxed with momentum: the rank-r approximation of
  ``L + 1.5 (W - L - Q) + mu (L - L_prev)`` (mu 0.4 for NF3, 0.5 for NF4, 0.3 for NF8, which steps
  2.5 instead of 1.5; fewer iterations *and* lower errors than plain
  alternation); an over-relaxed step that raises the error is undone and retried shorter,
  never shorter than plain alternation (except for NF8 with 2-4 bit scales, whose long steps go
  on after a rise: :data:`NF8_STOP`); plain steps that raise it go on from there (the
  landscape of NF2 codes and coarse scales is noisy), the best iterate being kept;
* it stops when the best objective fell by less than ``tol`` x :data:`TOL_FACTOR` [bits]
  (relative) over the last two steps (three for NF8 with 2-4 bit scales: :data:`NF8_STOP`)
  and by less than :data:`STOP_WINDOW` times that over twice as many, never before
  :data:`COLD_MIN_STEPS` steps of a cold start, or, with ``cheap_stop``, before quantizing
  again when the factors barely moved;
* inside the loop ``W - L1 L2 - Q`` is computed with :func:`bitalloc.quant.quantize_residual`
  (bit for bit the same values, no bit packing; on the CPU a compiled kernel rounds, see
  :mod:`bitalloc.quant.kernels`); ``Decomposition.q`` is packed on first access;
* warm starts (``init=``) from a neighbouring config, and :func:`decompose_many`, which
  profiles many configs of one matrix and shares work between them.

On CPU, glibc is asked once per process to keep freed memory (:func:`_keep_freed_memory`):
the loop's matrix-sized temporaries otherwise page-fault in on every step.

With a Fisher estimate ``F`` (rows x cols, non-negative) the rank-r step runs on
``D_r (W - Q) D_c`` with ``D_r = diag(sqrt(mean_cols F))`` and ``D_c = diag(sqrt(mean_rows F))``
(LQ-LoRA's "two-sided" heuristic) and maps the factors back; the objective, and so the choice
of the best iterate and the stopping rule, is then ``||sqrt(F) * (W - Q - L1 L2)||_F^2``.
All work is in float32 on W's device; errors are summed in float64.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from bitalloc.configs import LOWRANK_NF8, QuantConfig
from bitalloc.quant import QuantizedTensor, kernels, quantize, quantize_residual

log = logging.getLogger(__name__)

__all__ = ["Decomposition", "decompose", "decompose_many", "fisher_scalings"]

#: Fisher row/column weights are floored at this fraction of their largest value.
FISHER_EPS = 1e-6
#: Default relative-improvement tolerance of the stopping rule (:func:`decompose`).
DEFAULT_TOL = 1e-3
#: The same for :func:`decompose_many` (looser: many configs, measured against LQ-LoRA).
DEFAULT_MANY_TOL = 1e-2
#: Default iteration cap (LQ-LoRA's is 100; with the subspace warm start ~10 is typical).
DEFAULT_MAX_ITERS = 50
#: Extra columns carried by the subspace iteration beyond the rank.
DEFAULT_OVERSAMPLE = 8
#: The same for :func:`decompose_many`: none. The loop carries the subspace from step to step,
#: so it converges over the steps anyway; on 14 SmolLM2 matrices (lqlora space, rank 64) 8
#: extra columns cost 4% more CPU time for the same errors (bench/profile_speed.py).
DEFAULT_MANY_OVERSAMPLE = 0
#: Singular vectors of W kept for the cold starts of one matrix (more are recomputed on demand).
COLD_SVD_KEEP = 256
#: The cold start's top-r part of W is an exact SVD up to this smaller side, else an accurate
#: subspace iteration (2r columns, :data:`COLD_POWER_ITERS` passes).
COLD_EXACT_MAX_SIDE = 1024
COLD_POWER_ITERS = 4
#: A cold start takes at least this many rank-r steps before the stopping rule may end it:
#: NF8 with 2-bit scales can rise for a step or two before a long descent (measured: 9.8x
#: the reference's error on one SmolLM2 matrix when stopped there).
COLD_MIN_STEPS = 6
#: The loop also goes on while the best objective fell by more than this x ``tol`` over the
#: last 2 x patience steps (a bump in a fast descent is not convergence), see :func:`_converged`.
STOP_WINDOW = 3.0
#: The warm subspace pass orthonormalizes through a Cholesky factor of the Gram matrix
#: (:func:`_range_svd`) instead of a Householder QR.
CHOLESKY_QR = True
#: The warm rank-r step keeps its target split, ``A1 @ A2 + eta * D``: the low-rank part (the
#: stored factors, and the previous ones for momentum) as float32 factors, and the dense part
#: ``D = W - L - Q``, whose two products with the subspace run in bfloat16 with float32
#: accumulation. Only the correction the step adds is rounded (to 2^-9 of itself); on CPUs
#: with AVX512-BF16 these products are about 4x faster than float32 ones.
LOWP_RESIDUAL = True
#: ... for matrices of at least this many entries (below, the extra thin products and
#: conversions cost more than they save: measured on SmolLM2's 192 x 576 k_proj), and only
#: where bfloat16 products are native (:func:`_native_bf16`; elsewhere they are emulated
#: and slower than float32 ones).
LOWP_MIN_SIZE = 1 << 18


def _cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether a Linux ``/proc/cpuinfo`` lists x86 bfloat16 instructions (AVX512-BF16, AMX)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def _native_bf16(device_type: str, index: int | None = None) -> bool:
    """Whether bfloat16 matrix products run natively on this device: a CUDA device of compute
    capability 8.0 or above, or a CPU that :func:`_cpu_has_bf16` (read once per process; a
    fixed answer, so a profile's numbers do not depend on a timing)."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device_type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return _cpu_has_bf16(f.read())
        except OSError:
            return False
    return False


def _minus_low(W: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """``W - l1 @ l2`` as one fused product (no separate ``l1 @ l2`` and subtraction pass:
    about 0.1-0.2 ms less per evaluation of a 1536 x 576 matrix here)."""
    return torch.addmm(W, l1, l2, alpha=-1.0)


def _quantize_residual(x: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``x - quantize(x, cfg).dequantize()`` bit for bit, without packing (x is already checked)."""
    return quantize_residual(x, cfg, check=False)


class _DeferredQ:
    """``quantize(W - L1 @ L2, cfg)``, computed on first access of ``Decomposition.q``.

    Profiling needs only the errors; packing Q for each of hundreds of configs would cost as
    much as a step of the loop. The product is recomputed from the very tensors the loop used,
    with the same operations, so Q equals the one that was evaluated.
    """

    __slots__ = ("W", "l1", "l2", "cfg")

    def __init__(self, W: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, cfg: QuantConfig) -> None:
        self.W, self.l1, self.l2, self.cfg = W, l1, l2, cfg

    def __call__(self) -> "QuantizedTensor":
        return quantize(_minus_low(self.W, self.l1, self.l2), self.cfg)


_MALLOC_TUNED = False


def _keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse (once per process; CPU work only).

    Each step of the loop allocates and frees several matrix-sized temporaries. With glibc's
    defaults a freed block of a few MB goes back to the OS (trim of the heap top, or munmap)
    and the next allocation page-faults it in again: the quantizer of a 1536x576 matrix ran
    about 2x slower that way (bench/profile_speed.py, micro-benchmark). This raises the trim threshold
    to 1 GiB and fixes the mmap threshold at 32 MiB. No-op off glibc, or when the environment
    variable ``BITALLOC_MALLOC_DEFAULTS`` is set.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if os.environ.get("BITALLOC_MALLOC_DEFAULTS"):  # opt out (and the A/B in the benchmark)
        return
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if not name:
            return
        libc = ctypes.CDLL(name)
        mallopt = getattr(libc, "mallopt", None)
        if mallopt is None:
            return
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc, or no libc found: keep the defaults
        pass


@dataclass
class Decomposition:
    """``W ≈ Q + L1 @ L2`` for one config; ``l1``/``l2`` are float32 and equal the stored values.

    ``error`` is ``||W - (Q + L1 L2)||_F^2``; ``error_fisher`` the ``sqrt(F)``-weighted one when a
    Fisher estimate was given (else None). ``iterations`` counts rank-r steps taken (0 for rank
    0 or an ``init`` that was kept as it was); ``history`` the objective after each iterate
    (the warm start first, when there is one). ``l1_q``/``l2_q`` hold the NF8-quantized
    factors (``L1`` transposed) when ``cfg.lowrank_bits == 8``.
    """

    cfg: QuantConfig
    q: "QuantizedTensor"
    l1: torch.Tensor
    l2: torch.Tensor
    error: float
    error_fisher: float | None
    iterations: int
    history: list[float] = field(default_factory=list)
    l1_q: "QuantizedTensor | None" = None
    l2_q: "QuantizedTensor | None" = None
    basis: torch.Tensor | None = field(default=None, repr=False)  # right subspace, for warm starts

    @property
    def rank(self) -> int:
        """The rank r of the low-rank part."""
        return int(self.l1.shape[1])

    @property
    def objective(self) -> float:
        """The number the best iterate was chosen by: ``error_fisher`` if present, else ``error``."""
        return self.error if self.error_fisher is None else self.error_fisher

    def reconstruct(self) -> torch.Tensor:
        """``Q + L1 @ L2`` as a float32 tensor on the device of W."""
        out = self.q.dequantize().float()
        if self.rank:
            out = out + self.l1 @ self.l2
        return out


def _get_q(self: Decomposition) -> "QuantizedTensor":
    q = self.__dict__["_q"]
    if isinstance(q, _DeferredQ):
        q = self.__dict__["_q"] = q()
    return q


def _set_q(self: Decomposition, value: Any) -> None:
    self.__dict__["_q"] = value


# ``q`` is quantized lazily (see _DeferredQ); to its readers it is a plain field.
Decomposition.q = property(_get_q, _set_q, doc="Q, the quantized part (a QuantizedTensor).")  # type: ignore[assignment]


# ----- validation and shared per-matrix state ------------------------------------------------
def _check_matrix(W: Any) -> torch.Tensor:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"W must be a torch.Tensor, got {type(W).__name__}")
    if W.ndim != 2:
        raise ValueError(f"W must be a 2-D matrix, got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"W must not be empty, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"W must be a floating-point tensor, got {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"W contains {bad} NaN or infinite value(s)")
    return W


def _check_fisher(fisher: Any, W: torch.Tensor) -> torch.Tensor | None:
    if fisher is None:
        return None
    if not isinstance(fisher, torch.Tensor):
        raise ValueError(f"the Fisher estimate must be a torch.Tensor, got {type(fisher).__name__}")
    if tuple(fisher.shape) != tuple(W.shape):
        raise ValueError(
            f"the Fisher estimate has shape {tuple(fisher.shape)} but W has shape {tuple(W.shape)}"
        )
    F = fisher.to(device=W.device, dtype=torch.float32)
    if not bool(torch.isfinite(F).all()):
        raise ValueError("the Fisher estimate contains NaN or infinite value(s)")
    if bool((F < 0).any()):
        raise ValueError(
            f"the Fisher estimate must be non-negative; its minimum is {float(F.min()):.3g}"
        )
    return F


def _check_rank(cfg: QuantConfig, W: torch.Tensor) -> None:
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"expected a QuantConfig, got {type(cfg).__name__}")
    rows, cols = W.shape
    if cfg.rank > min(rows, cols):
        raise ValueError(
            f"rank {cfg.rank} (config {cfg.name}) exceeds min(rows, cols) = {min(rows, cols)} "
            f"of a {rows}x{cols} matrix"
        )


def fisher_scalings(F: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``(d_r, d_c)`` (shapes rows x 1, 1 x cols) of a Fisher estimate.

    ``d_r = sqrt(mean of F over columns)``, ``d_c = sqrt(mean of F over rows)``, each floored at
    ``FISHER_EPS`` times its maximum (all-zero F gives uniform weights).
    """

    def floor(m: torch.Tensor) -> torch.Tensor:
        top = float(m.max())
        if top <= 0:
            return torch.ones_like(m)
        return m.clamp_min(FISHER_EPS * top).sqrt()

    return floor(F.mean(dim=1, keepdim=True)), floor(F.mean(dim=0, keepdim=True))


class _Matrix:
    """One validated matrix, in float32, with its Fisher weights (computed once per matrix)."""

    def __init__(self, W: torch.Tensor, fisher: torch.Tensor | None, seed: int) -> None:
        self.orig = _check_matrix(W)
        self.W = W.detach().float()
        if self.W.device.type == "cpu":
            _keep_freed_memory()
        self.F = _check_fisher(fisher, W)
        if self.F is not None:
            self.d_r, self.d_c = fisher_scalings(self.F)
        else:
            self.d_r = self.d_c = None
        self.seed = seed
        # the first rank-r step of every cold start is the same (top-r of W): computed once
        self._cold: dict[Any, tuple[Any, ...]] = {}
        # the last result with bf16 factors and W minus the product of its factors: a twin or
        # a warm start from it evaluates the same factors first, so the product need not be
        # redone
        self.last_target: tuple[Decomposition, torch.Tensor] | None = None

    def target_of(self, init: Any, cfg: QuantConfig) -> torch.Tensor | None:
        """``W - L1 @ L2`` of ``init``'s stored factors if it is the last result, of the same
        rank and, like ``cfg``, with bf16 factors (storing them again changes nothing); else
        None."""
        last = self.last_target  # only ever set for results with bf16 factors
        if last is None or last[0] is not init or cfg.lowrank_bits != 16 or init.rank != cfg.rank:
            return None
        return last[1]

    def generator(self, stream: int = 0) -> torch.Generator:
        """A generator seeded from ``seed``; another ``stream`` draws other sketches.

        The CPU generator keeps only the low 32 bits of a seed, so the streams are spread over
        them (golden-ratio steps).
        """
        gen = torch.Generator(device=self.W.device)
        gen.manual_seed(self.seed if stream == 0 else (self.seed + 0x9E3779B9 * stream) & 0xFFFFFFFF)
        return gen

    def cold_factors(
        self, r: int, opts: "_Opts", gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The first rank-r step of a cold start (from ``Q = 0``): the top-r part of W.

        The same for every config, so computed once per matrix. With ``opts.exact_cold`` it
        is the exact (see :meth:`_top_of_w`) SVD of (the Fisher-weighted) W, and the second
        step then draws a fresh sketch with power iterations instead of starting from W's
        subspace: both accurate early steps lead the NF2 loop to markedly lower errors than
        LQ-LoRA's randomized ones (bench/profile_speed.py), for one SVD per matrix and one
        sketch per cold start.
        Otherwise it is the randomized sketch of the later steps, with ``gen`` left in the
        state computing it would leave.
        """
        if opts.exact_cold:
            U, S, V = self._top_of_w(r)
            # no warm basis: W's top subspace is a poor start for the SVD of W - Q (NF2's Q
            # above all), so the second step sketches afresh, with power iterations
            return (*_balanced(self, U[:, :r], S[:r], V[:, :r]), None)
        key = (r, opts.oversample, opts.power_iters)
        if key not in self._cold:
            L1, L2, basis = _factors(self, self.W, r, None, opts, gen)
            self._cold[key] = (L1, L2, basis, gen.get_state())
        L1, L2, basis, state = self._cold[key]
        gen.set_state(state)
        return L1, L2, basis

    def _top_of_w(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U, S, V)`` of (the Fisher-weighted) W, accurate in at least the top r columns.

        An exact SVD when the smaller side is at most :data:`COLD_EXACT_MAX_SIDE` (its
        leading :data:`COLD_SVD_KEEP` columns kept); above that, where an SVD costs more than
        the loop (measured single-threaded on 4096 x 11008: 56 s, against 1.3 s for this and
        about 2 s per step of the loop at rank 64), a subspace iteration with 2r columns and
        :data:`COLD_POWER_ITERS` passes, as good for the loop (SmolLM2's NF2 entries with it
        forced: the same errors as with the exact SVD).
        """
        cached = self._cold.get("top")
        if cached is not None and cached[3] >= r:
            return cached[:3]
        R = self.W if self.d_r is None else self.d_r * self.W * self.d_c
        if min(R.shape) <= COLD_EXACT_MAX_SIDE:
            U, S, Vh = torch.linalg.svd(R, full_matrices=False)
            keep = max(COLD_SVD_KEEP, r)
            top = (U[:, :keep], S[:keep], Vh[:keep].T, min(keep, S.numel()))
        else:
            U, S, V, _ = _top_subspace(R, r, None, oversample=r, power_iters=COLD_POWER_ITERS, gen=self.generator())
            top = (U, S, V, r)
        self._cold["top"] = top
        return top[:3]

    def errors(self, E: torch.Tensor) -> tuple[float, float | None]:
        """Plain and Fisher-weighted squared Frobenius norms of a residual ``E``."""
        if self.F is None and kernels.applies(E):
            return kernels.sum_squares(E.contiguous()), None
        E2 = E * E
        plain = float(E2.sum(dtype=torch.float64))
        if self.F is None:
            return plain, None
        return plain, float((self.F * E2).sum(dtype=torch.float64))


# ----- the rank-r step -----------------------------------------------------------------------
class _Target:
    """The rank-r step's target ``sum_i c_i A1_i @ A2_i + eta * D``, kept split (:data:`LOWP_RESIDUAL`).

    Each ``(c_i, A1_i, A2_i)`` is a low-rank term in float32 factors (rows x r, r x cols), ``D``
    the dense part. ``T @ V`` and ``Y^T T`` cost thin products with the factors and one
    bfloat16 product with ``D``; :meth:`dense` forms the matrix for the other paths.
    """

    __slots__ = ("terms", "eta", "D", "_D_low")

    def __init__(
        self, terms: list[tuple[float, torch.Tensor, torch.Tensor]], eta: float, D: torch.Tensor
    ) -> None:
        self.terms, self.eta, self.D = terms, eta, D
        self._D_low: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.D.shape

    def weighted(self, d_r: torch.Tensor, d_c: torch.Tensor) -> "_Target":
        """``diag(d_r) T diag(d_c)``, still split."""
        terms = [(c, d_r * A1, A2 * d_c) for c, A1, A2 in self.terms]
        return _Target(terms, self.eta, d_r * self.D * d_c)

    def dense(self) -> torch.Tensor:
        """The target as one float32 matrix."""
        out = self.eta * self.D
        for c, A1, A2 in self.terms:
            out = torch.addmm(out, A1, A2, alpha=c)
        return out

    def _D_bf16(self) -> torch.Tensor:
        if self._D_low is None:
            self._D_low = self.D.bfloat16()
        return self._D_low

    def matmul(self, V: torch.Tensor) -> torch.Tensor:
        """``T @ V``."""
        out = (self._D_bf16() @ V.bfloat16()).float()
        out.mul_(self.eta)
        for c, A1, A2 in self.terms:
            out = torch.addmm(out, A1, A2 @ V, alpha=c)
        return out

    def rmatmul_t(self, Y: torch.Tensor) -> torch.Tensor:
        """``Y^T @ T``."""
        out = (Y.T.bfloat16() @ self._D_bf16()).float()
        out.mul_(self.eta)
        for c, A1, A2 in self.terms:
            out = torch.addmm(out, Y.T @ A1, A2, alpha=c)
        return out


def _mm(R: "torch.Tensor | _Target", V: torch.Tensor) -> torch.Tensor:
    return R.matmul(V) if isinstance(R, _Target) else R @ V


def _tmm(Y: torch.Tensor, R: "torch.Tensor | _Target") -> torch.Tensor:
    return R.rmatmul_t(Y) if isinstance(R, _Target) else Y.T @ R


def _dense(R: "torch.Tensor | _Target") -> torch.Tensor:
    return R.dense() if isinstance(R, _Target) else R


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced")[0]


def _use_exact_svd(rows: int, cols: int, k: int) -> bool:
    """Exact SVD when the sketch would cover much of the smaller side, or the matrix is tiny."""
    return 2 * k >= min(rows, cols) or rows * cols <= 128 * 128


def _top_subspace(
    R: torch.Tensor,
    r: int,
    basis: torch.Tensor | None,
    *,
    oversample: int,
    power_iters: int,
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-r SVD ``(U, S, V)`` of R, and the k right vectors to warm-start the next call with.

    Cold (``basis is None``): a Gaussian sketch of k = r + oversample columns and
    ``power_iters`` power iterations. Warm: one subspace-iteration pass from ``basis``
    (R changes little between iterations, so its previous top subspace is a good start).
    """
    rows, cols = R.shape
    k = min(r + oversample, rows, cols)
    if _use_exact_svd(rows, cols, k):
        U, S, Vh = torch.linalg.svd(_dense(R), full_matrices=False)
        return U[:, :r], S[:r], Vh[:r].T, None
    if basis is None or basis.shape != (cols, k):
        R = _dense(R)
        omega = torch.randn(cols, k, generator=gen, device=R.device, dtype=R.dtype)
        if basis is not None:  # keep what a warm start knows, pad/trim to k columns
            n = min(basis.shape[1], k)
            omega[:, :n] = basis[:, :n]
        basis, passes = omega, power_iters
    else:
        passes = 0
    Y = _mm(R, basis)
    if passes == 0 and CHOLESKY_QR:
        found = _range_svd(R, Y, r)
        if found is not None:
            return found
    Y = _orth(Y)
    for _ in range(passes):
        Y = _orth(R @ _orth(R.T @ Y))
    Ub, S, V = _small_svd(_tmm(Y, R))
    return Y @ Ub[:, :r], S[:r], V[:, :r], V


def _range_svd(
    R: "torch.Tensor | _Target", Y: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Top-r ``(U, S, V)`` of R projected on the column space of Y (rows x k), and all k V's.

    Cholesky QR instead of a Householder QR of Y (measured 0.3 ms against 0.8 ms for a
    1536 x 72 Y): with ``C C^T = Y^T Y`` (float64, k x k), ``Q = Y C^-T`` is orthonormal and
    ``Q^T R = C^-1 Y^T R``, whose SVD comes from its k x k Gram matrix as in :func:`_small_svd`.
    None when Y is too ill-conditioned for that (the caller then orthonormalizes Y).

    Y's Gram matrix is float64 (Q must be orthonormal); that of ``B = Y^T R`` and its
    eigendecomposition are float32: for any orthogonal eigenvector matrix E the product
    ``U S V^T`` is ``Q Q^T R`` (V is computed from B and E), so their rounding moves only the
    balance of the factors and which k - r directions are dropped. Measured on 14 SmolLM2
    matrices (lqlora, r64): about 3% less time, the same errors within the seed noise.
    """
    Y64 = Y.double()
    C, info = torch.linalg.cholesky_ex(Y64.T @ Y64)
    diag = C.diagonal()
    if int(info) != 0 or not bool(diag.min() > 1e-5 * diag.max()):
        return None
    B = _tmm(Y, R)  # k x n
    left = torch.linalg.solve_triangular(C, (B @ B.T).double(), upper=False)  # C^-1 (B B^T)
    gram = torch.linalg.solve_triangular(C, left.T, upper=False)  # C^-1 B B^T C^-T (symmetric)
    S, evecs, keep = _gram_singular((gram + gram.T) / 2, dtype=torch.float32)
    T = torch.linalg.solve_triangular(C.T, evecs, upper=True)  # C^-T E: U = Y T
    # V = B^T T / S (zero columns where not kept) as one float32 product, as (T^T B)^T
    # because B.T @ T was 4x slower for a wide B
    V = ((T * (keep / torch.where(keep, S, 1.0))).to(Y.dtype).T @ B).T
    U = Y @ T[:, :r].to(Y.dtype)
    return U, S[:r].to(Y.dtype), V[:, :r], V


def _gram_singular(
    gram: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Singular values (descending), left vectors and kept mask from a k x k Gram matrix.

    The eigendecomposition runs in ``dtype`` (default: the Gram matrix's own); the results
    are in the Gram matrix's dtype. Directions with a singular value below 1e-7 of the largest
    are not kept (see :func:`_right_vectors`).
    """
    evals, evecs = torch.linalg.eigh(gram if dtype is None else gram.to(dtype))
    evals, evecs = evals.to(gram.dtype).flip(0), evecs.to(gram.dtype).flip(1)
    S = evals.clamp_min(0).sqrt()
    keep = S > 1e-7 * S[0].clamp_min(torch.finfo(torch.float64).tiny)
    return S, evecs, keep


def _right_vectors(BtU: torch.Tensor, S: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``V = B^T U / S``, with a zero column for each direction that is not kept."""
    return BtU / torch.where(keep, S, 1.0) * keep


def _small_svd(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of a wide k x n matrix from the eigenvectors of its k x k Gram matrix.

    In float64, so the squared singular values keep their precision; several times faster
    than a full SVD of B on CPU. Directions with a singular value below 1e-7 of the largest
    get a zero column in V (they are dropped from the factors anyway by their zero weight).
    """
    B64 = B.double()
    S, evecs, keep = _gram_singular(B64 @ B64.T)
    V = _right_vectors((evecs.T @ B64).T, S, keep)
    return evecs.to(B.dtype), S.to(B.dtype), V.to(B.dtype)


def _factors(
    m: _Matrix, R: "torch.Tensor | _Target", r: int, basis: torch.Tensor | None, opts: "_Opts",
    gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Balanced factors ``L1 = U sqrt(S)``, ``L2 = sqrt(S) V^T`` of R's top-r part (weighted)."""
    if m.d_r is not None:
        R = R.weighted(m.d_r, m.d_c) if isinstance(R, _Target) else m.d_r * R * m.d_c
    U, S, V, basis = _top_subspace(
        R, r, basis if opts.warm_subspace else None,
        oversample=opts.oversample, power_iters=opts.power_iters, gen=gen,
    )
    return (*_balanced(m, U, S, V), basis)


def _balanced(m: _Matrix, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L1 = U sqrt(S)``, ``L2 = sqrt(S) V^T``, with the Fisher weights divided back out."""
    s = S.clamp_min(0).sqrt()
    L1 = U * s
    L2 = (V * s).T
    if m.d_r is not None:
        L1 = L1 / m.d_r
        L2 = L2 / m.d_c
    return L1, L2.contiguous()


def _store(
    L1: torch.Tensor, L2: torch.Tensor, cfg: QuantConfig
) -> tuple[torch.Tensor, torch.Tensor, "QuantizedTensor | None", "QuantizedTensor | None"]:
    """The factors as the config stores them (bf16-rounded or NF8-decoded), as float32."""
    if cfg.lowrank_bits == 16:
        return L1.bfloat16().float(), L2.bfloat16().float(), None, None
    q1 = quantize(L1.T.contiguous(), LOWRANK_NF8)
    q2 = quantize(L2.contiguous(), LOWRANK_NF8)
    return q1.dequantize().float().T.contiguous(), q2.dequantize().float(), q1, q2


# ----- the alternating loop ------------------------------------------------------------------
@dataclass(frozen=True)
class _Opts:
    max_iters: int = DEFAULT_MAX_ITERS
    tol: float = DEFAULT_TOL
    relax: float = 1.0
    momentum: float = 0.0
    warm_subspace: bool = True
    cheap_stop: bool = False
    backtrack: bool = True
    oversample: int = DEFAULT_OVERSAMPLE
    power_iters: int = 2
    min_relax: float = 0.2
    patience: int = 2
    plain_floor: bool = False
    window: float = STOP_WINDOW
    exact_cold: bool = True
    cold_min_steps: int = COLD_MIN_STEPS
    stream: int = 0  # which random stream the sketches come from (see _Matrix.generator)


#: (over-relaxation, momentum) of the rank-r step by code bits (measured, bench/profile_speed.py).
#: NF8's error keeps falling for many steps as the factors adapt to the fine grid: longer
#: steps (2.5 instead of 1.5) cut its steps by about 15% and ended lower on 11 SmolLM2
#: matrices.
#: NF3/NF4 momentum went from 0.3 to 0.4/0.5 in session 9: on 14 matrices, seeds 0/1/2, their
#: entries more than 1% above the reference's error went from 7/4/11 to 2/2/4 (NF4's geometric
#: mean ratio 0.79 -> 0.76) for 5% more steps; 0.6 made NF3 worse (19 such entries, seed 0).
STEP = {2: (1.0, 0.0), 3: (1.5, 0.4), 4: (1.5, 0.5), 8: (2.5, 0.3)}


def _step_opts(cfg: QuantConfig, relax: float | None, momentum: float | None) -> dict[str, float]:
    """Over-relaxation and momentum of the rank-r step for a config (None = the default).

    Defaults (:data:`STEP`, measured in bench/profile_speed.py): ``L + 1.5 (W - L - Q)`` plus
    0.4 (NF3) or 0.5 (NF4) of the last change of L (fewer iterations, lower error), 2.5 and
    0.3 for NF8; plain alternation for NF2, whose rugged landscape does worse with longer steps.
    """
    default = STEP.get(cfg.bits, STEP[4])
    return {
        "relax": default[0] if relax is None else float(relax),
        "momentum": default[1] if momentum is None else float(momentum),
    }


#: Stopping tolerance by code bits, as a multiple of the ``tol`` passed in (measured,
#: bench/profile_speed.py): NF3/NF4 converge smoothly and end well below LQ-LoRA's error, so
#: they stop early; NF8's error barely moves after the first steps (LQ-LoRA's loop runs 30-50
#: there for little gain); NF2 keeps the base tolerance (longer runs do not help its rugged
#: landscape, measured with 0.1 and 0.3). Against {NF3/4: 2, NF8: 0.3 with 3 steps of
#: patience}, these cut CPU time by about 25% on 8 SmolLM2 matrices (lqlora space, rank 64)
#: for 3 more of 336 entries above 1.01x the reference's error and the same worst ratio.
#: NF8 went from 2 to 4 with its longer steps (:data:`STEP`): together 8-20% less CPU time on
#: 11 matrices, with fewer NF8 entries above 1.01x the reference's error.
#: NF3 went back from 4 to 2 in session 11 (14 SmolLM2 matrices of layers 0-1, lqlora space
#: at rank 64, 1326 reference entries, seeds 0/1/2, with :data:`REPAIR_MARGIN`): NF3's fp16
#: twins, evaluated once at their fp32 sibling's factors, kept ending 1.6-1.9% above the
#: reference on L0 down_proj when the sibling stopped after 2 steps; with 2 the NF3 entries
#: more than 1% above it went from 2/2/2 to 0/0/0, for 16% more NF3 quantizations than with
#: the margins alone (7% fewer than session 10's loop, seed 0).
TOL_FACTOR = {2: 1.0, 3: 2.0, 4: 4.0, 8: 4.0}


#: Stopping options of NF8 configs by scale bits (measured in session 10 on 14 SmolLM2 matrices
#: of layers 0-1, lqlora space at rank 64, 1326 reference entries, seeds 0/1/2). With 2-4 bit
#: scales the error keeps falling for 40-60 steps, but an over-relaxed step that rises (often,
#: on this rugged landscape) sent the loop back to plain alternation, which crawls. L0
#: down_proj's nf8-g16-s2x16-fp32 alone, without a stopping tolerance: 0.82x the reference's
#: error after 60 steps with the retreat, 0.76x after 35 without it. So a rise is taken as it
#: is (no retreat), and the loop waits 3 steps without progress, not 2 (a steady descent of
#: 2-4% a step stopped at its first rise with 2). With :data:`REPAIR_NF8_SCALE_BITS`, in
#: session 10: 2 steps for 3-4 bit scales left NF8 entries more than 1% above the reference
#: at 2/6/5 (of 337), 3 steps brought them to 0/5/1, for 9% more quantization work (entries x
#: size), which :data:`REPAIR_MARGIN` paid back in session 11. 8-bit scales (a smooth
#: landscape) keep the retreat: without it their errors rose by 9% (geometric mean).
NF8_STOP = {
    2: {"backtrack": False, "patience": 3},
    3: {"backtrack": False, "patience": 3},
    4: {"backtrack": False, "patience": 3},
}


def _stop_opts(cfg: QuantConfig, tol: float) -> dict[str, Any]:
    """Stopping rule by config (measured, bench/profile_speed.py).

    A rise after an over-relaxed step retreats to plain alternation, never below it; plain
    steps that rise go on from the new iterate (the landscape of NF2 codes and coarse scales
    is noisy, and under-relaxed steps crawl), and the best-iterate rule stops the loop. The
    tolerance is scaled by :data:`TOL_FACTOR`. NF8 with coarse scales never retreats and
    waits 3 steps without progress (:data:`NF8_STOP`).
    """
    out: dict[str, Any] = {"plain_floor": True, "tol": tol * TOL_FACTOR.get(cfg.bits, 1.0)}
    if cfg.bits == 8:
        out.update(NF8_STOP.get(cfg.scale_bits, {}))
    return out


@dataclass
class _Iterate:
    q: Any
    target: torch.Tensor  # W - L1 @ L2 of the stored factors (what Q quantizes)
    resid: torch.Tensor  # W - L1 @ L2 - Q
    l1: torch.Tensor
    l2: torch.Tensor
    l1_q: Any
    l2_q: Any
    error: float
    error_fisher: float | None
    l1_raw: torch.Tensor  # the factors before storage rounding
    l2_raw: torch.Tensor

    @property
    def objective(self) -> float:
        return self.error if self.error_fisher is None else self.error_fisher

    def result(self, cfg: QuantConfig, iters: int, history: list[float], basis: Any) -> Decomposition:
        return Decomposition(
            cfg, self.q, self.l1, self.l2, self.error, self.error_fisher, iters, history,
            self.l1_q, self.l2_q, basis,
        )


def _objective(m: _Matrix, E: torch.Tensor) -> float:
    plain, fisher = m.errors(E)
    return plain if fisher is None else fisher


def _step_size(m: _Matrix, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> float:
    """``||A B - C D||^2`` (Fisher-weighted when the matrix has F); plain via r x r Gram matrices."""
    if m.F is not None:
        return _objective(m, A @ B - C @ D)
    A, B, C, D = A.double(), B.double(), C.double(), D.double()  # cancellation: keep float64
    ab = float(((A.T @ A) * (B @ B.T)).sum())
    cd = float(((C.T @ C) * (D @ D.T)).sum())
    cross = float(((A.T @ C) * (B @ D.T)).sum())
    return max(ab + cd - 2.0 * cross, 0.0)


def _evaluate(
    m: _Matrix, cfg: QuantConfig, L1: torch.Tensor, L2: torch.Tensor,
    target: torch.Tensor | None = None,
) -> _Iterate:
    """Store the factors, quantize the rest against them, and measure the error.

    ``target``, when given, is ``W - L1 @ L2`` of the stored factors (known from an earlier
    result).
    """
    s1, s2, q1, q2 = _store(L1, L2, cfg)
    if target is None:
        target = _minus_low(m.W, s1, s2)
    q = _DeferredQ(m.W, s1, s2, cfg)
    resid = _quantize_residual(target, cfg)
    err, errf = m.errors(resid)
    return _Iterate(q, target, resid, s1, s2, q1, q2, err, errf, L1, L2)


def _init_factors(init: Any, m: _Matrix, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(L1, L2, basis)`` of a warm start, trimmed to (or zero-padded up to) rank r."""
    basis = None
    if isinstance(init, Decomposition):
        L1, L2, basis = init.l1, init.l2, init.basis
    elif isinstance(init, (tuple, list)) and len(init) == 2:
        L1, L2 = init
    else:
        raise ValueError(
            f"init must be a Decomposition or a pair (L1, L2), got {type(init).__name__}"
        )
    rows, cols = m.W.shape
    L1 = torch.as_tensor(L1).to(device=m.W.device, dtype=torch.float32)
    L2 = torch.as_tensor(L2).to(device=m.W.device, dtype=torch.float32)
    if L1.ndim != 2 or L2.ndim != 2 or L1.shape[0] != rows or L2.shape[1] != cols or L1.shape[1] != L2.shape[0]:
        raise ValueError(
            f"init factors of shapes {tuple(L1.shape)} and {tuple(L2.shape)} do not fit a "
            f"{rows}x{cols} matrix"
        )
    k = L1.shape[1]
    if k >= r:
        L1, L2 = L1[:, :r], L2[:r]
    else:
        L1 = torch.cat([L1, L1.new_zeros(rows, r - k)], dim=1)
        L2 = torch.cat([L2, L2.new_zeros(r - k, cols)], dim=0)
    if basis is None and k > 0:
        basis = _orth((L2.T if m.d_c is None else m.d_c.T * L2.T)[:, : min(k, r)])
    return L1.contiguous(), L2.contiguous(), basis


def _rank0(m: _Matrix, cfg: QuantConfig) -> Decomposition:
    q = quantize(m.orig, cfg)
    err, errf = m.errors(m.W - q.dequantize().float())
    rows, cols = m.W.shape
    empty1 = m.W.new_zeros(rows, 0)
    empty2 = m.W.new_zeros(0, cols)
    return Decomposition(cfg, q, empty1, empty2, err, errf, 0, [errf if errf is not None else err])


def _converged(bests: list[float], opts: _Opts) -> bool:
    """Whether the best objective fell by less than ``tol`` over the last ``patience`` steps.

    With ``opts.window`` > 0 the loop also goes on while the best fell by more than
    ``window x tol`` over the last ``2 x patience`` steps: a bump in a fast descent (an
    over-relaxed step that rose, then a plain one that did not beat the best) is not
    convergence.
    """
    p = opts.patience
    then = bests[-1 - p]
    if then - bests[-1] > opts.tol * then:
        return False
    if opts.window > 0:
        longer = bests[max(0, len(bests) - 1 - 2 * p)]
        if longer - bests[-1] > opts.window * opts.tol * longer:
            return False
    return True


def _step_target(
    W: torch.Tensor, cur: _Iterate, prev: _Iterate | None, eta: float, momentum: float
) -> "torch.Tensor | _Target":
    """``L + eta (W - L - Q) + momentum (L - L_prev)`` of the iterate ``cur`` (``prev`` None: no
    momentum), split as :class:`_Target` (:data:`LOWP_RESIDUAL`, :data:`LOWP_MIN_SIZE`, native
    bfloat16 products) or as one matrix."""
    D = cur.resid
    if not LOWP_RESIDUAL or D.numel() < LOWP_MIN_SIZE or not _native_bf16(D.device.type, D.device.index):
        step = torch.add(W - cur.target, D, alpha=eta)  # L = W - (W - L)
        if prev is not None:  # L - L_prev = (W - L_prev) - (W - L)
            step = step + momentum * (prev.target - cur.target)
        return step
    if prev is None:
        return _Target([(1.0, cur.l1, cur.l2)], eta, D)
    return _Target([(1.0 + momentum, cur.l1, cur.l2), (-momentum, prev.l1, prev.l2)], eta, D)


def _solve(m: _Matrix, cfg: QuantConfig, init: Any, opts: _Opts) -> Decomposition:
    """The alternating loop for one config; returns the best iterate.

    ``opts.max_iters == 0`` with an ``init`` just quantizes against the given factors.
    """
    _check_rank(cfg, m.W)
    r = cfg.rank
    if r == 0:
        return _rank0(m, cfg)
    gen = m.generator(opts.stream)
    history: list[float] = []
    best: _Iterate | None = None
    cur: _Iterate | None = None
    basis = None
    if init is not None:
        L1, L2, basis = _init_factors(init, m, r)
        cur = best = _evaluate(m, cfg, L1, L2, m.target_of(init, cfg))
        history.append(cur.objective)
    iters = 0
    min_steps = opts.cold_min_steps if init is None else 0
    eta = opts.relax
    bests: list[float] = [] if best is None else [best.objective]
    prev: _Iterate | None = None  # the iterate before cur, for momentum
    for _ in range(opts.max_iters):
        if cur is None:
            L1, L2, basis = m.cold_factors(r, opts, gen)
        else:
            # the rank-r step on L + eta (W - L - Q) (+ momentum): eta = 1 is plain alternation
            step = _step_target(m.W, cur, prev if opts.momentum else None, eta, opts.momentum)
            L1, L2, basis = _factors(m, step, r, basis, opts, gen)
        if opts.cheap_stop and cur is not None:
            # cheap check before quantizing again: if the factors barely move, Q will not either
            if _step_size(m, L1, L2, cur.l1_raw, cur.l2_raw) <= 0.1 * opts.tol * cur.objective:
                break
        iters += 1
        nxt = _evaluate(m, cfg, L1, L2)
        history.append(nxt.objective)
        prev_obj = math.inf if cur is None else cur.objective
        if best is None or nxt.objective < best.objective:
            best = nxt
        bests.append(best.objective)
        if len(bests) > opts.patience and iters >= min_steps and _converged(bests, opts):
            break
        if opts.backtrack and nxt.objective > prev_obj:
            if opts.plain_floor and eta > 1.0:
                # an over-relaxed step made things worse: back to the best iterate, shorter steps
                # but never below plain alternation (under-relaxed steps crawl)
                eta = max(1.0, eta * 0.5)
                cur, prev = best, None
                continue
            if not opts.plain_floor:
                # the step made things worse: go back to the best iterate and take shorter steps
                eta *= 0.5
                if eta < opts.min_relax:
                    break
                cur, prev = best, None
                continue
            # plain steps rose: the landscape is noisy; go on from the new iterate (as LQ-LoRA
            # does) and let the stopping rule on the best iterate decide
        prev = None if cur is None or (opts.plain_floor and eta <= 1.0) else cur
        cur = nxt
    if best is None:
        raise ValueError("max_iters must be >= 1 without an init")
    log.debug("%s: %d iterations, objective %.6g", cfg.name, iters, best.objective)
    result = best.result(cfg, iters, history, basis)
    m.last_target = (result, best.target) if cfg.lowrank_bits == 16 else None
    return result


# ----- public entry points -------------------------------------------------------------------
@torch.no_grad()
def decompose(
    W: torch.Tensor,
    cfg: QuantConfig,
    fisher: torch.Tensor | None = None,
    *,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: float = DEFAULT_TOL,
    init: "Decomposition | tuple[torch.Tensor, torch.Tensor] | None" = None,
    relax: float | None = None,
    momentum: float | None = None,
    warm_subspace: bool = True,
    cheap_stop: bool = False,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = 2,
    seed: int = 0,
) -> Decomposition:
    """Decompose ``W ≈ Q + L1 @ L2`` for one config, on W's device; returns the best iterate.

    ``init`` (a Decomposition of a neighbouring config, or factors ``(L1, L2)``, trimmed to
    their first r components or zero-padded) starts from ``Q = quantize(W - L1 @ L2)`` instead
    of ``Q = 0``, and its subspace seeds the rank-r step. Stops when the best objective fell by
    less than ``tol`` x ``TOL_FACTOR[bits]`` (relative) over the last two steps (see
    :func:`_converged`; a cold start takes at least :data:`COLD_MIN_STEPS`), with ``cheap_stop``
    also when a step would barely move the factors, or after
    ``max_iters`` rank-r steps (with an ``init``, 0 just quantizes against it). ``relax``/``momentum`` set the step (None: by bits,
    see :func:`_step_opts`). Raises ValueError for a non-finite W, a Fisher estimate of
    another shape or with negative entries, or a rank above ``min(rows, cols)``.
    """
    if max_iters < (0 if init is not None else 1):
        raise ValueError(f"max_iters must be >= 1 (>= 0 with an init), got {max_iters}")
    m = _Matrix(W, fisher, seed)
    opts = _Opts(
        max_iters, warm_subspace=warm_subspace, cheap_stop=cheap_stop,
        oversample=oversample, power_iters=power_iters, **_step_opts(cfg, relax, momentum),
        **_stop_opts(cfg, tol),
    )
    return _solve(m, cfg, init, opts)


def _scale_precision(cfg: QuantConfig) -> tuple[int, int, int]:
    """Larger = more precise block scales (fp16 scales, then more scale bits, smaller groups, fp32).

    The dtype of the second-level scales comes last, so that each fp16 twin is solved right
    after its fp32 sibling (and reuses the product of its factors, see ``_Matrix.last_target``).
    """
    dtype_bits = 32 if cfg.scale_dtype == "fp32" else 16
    return (cfg.scale_bits, -cfg.scale_block, dtype_bits)


@functools.lru_cache(maxsize=1 << 16)  # pairs of configs, asked again for every matrix
def _is_twin(a: QuantConfig, b: QuantConfig) -> bool:
    """Same config up to the dtype of the second-level scales (their Q are nearly identical)."""
    return a.scale_bits != 16 and a != b and a.replace(scale_dtype=b.scale_dtype) == b


def _warm_plan(
    cfg: QuantConfig, parent: Decomposition | None, max_iters: int, twin_iters: int
) -> tuple[Decomposition | None, int]:
    """Whether (and for how many steps) ``cfg`` starts from ``parent``; None = a cold start.

    Measured on SmolLM2 (bench/profile_speed.py): an fp16/fp32 twin has all but the same Q,
    so its factors are reused as they are (``twin_iters`` steps; iterating cost 9% more time
    for no better errors on 4 matrices). The same quantizer at another rank or factor
    storage starts from the parent's (trimmed) factors. Codes solved from the coarsest scales
    up (:data:`COARSE_FIRST`, NF2) start from the nearest coarser config. Otherwise 2-bit
    scales start cold: coarse scales clip, the factors of another config's optimum are fitted
    to another clipping pattern, and starting from them was worse.
    """
    if parent is None:
        return None, max_iters
    if _same_quantizer(cfg, parent.cfg):
        return parent, max_iters
    if _is_twin(cfg, parent.cfg):
        return parent, twin_iters
    if cfg.bits not in COARSE_FIRST and cfg.scale_bits <= 2:
        return None, max_iters
    return parent, max_iters


#: Cold starts of each group's leader, by code bits (default 1; each further start draws other
#: sketches, the lowest result is kept). Every other NF2 config descends from the leader
#: (:data:`COARSE_FIRST`), and NF2's rugged landscape makes where one cold start ends a matter
#: of its sketches: L1 v_proj's nf2-g32-s2x256 ended 0.91-1.02x the reference's error with
#: seeds 0-5. Measured in session 11 on 14 SmolLM2 matrices (layers 0-1, lqlora space at rank
#: 64, 337 NF2 reference entries, seeds 0/1/2): NF2 entries more than 1% above the reference
#: 6/3/5 with one start, 4/3/6 with two (noise), 3/3/3 with three (NF2's geometric-mean ratio
#: 0.9568/0.9534/0.9495 against 0.9581/0.9559/0.9555), for 2.0% and 4.0% more quantization
#: work (entries x size).
LEADER_STARTS = {2: 3}

#: Code widths whose configs are solved from the coarsest scales up, each from the nearest
#: coarser config; the others go from the most precise scales down. Measured on 6 SmolLM2
#: matrices (lqlora space, rank 64, kernels on): NF2 from coarse up took 38.9 s against 44.4 s
#: (every NF2 config from a cold start, fine first) and had 4 entries (of 188) more than 1%
#: above the reference's error instead of 22. NF4 and NF8 from coarse up were much worse
#: (31 and 86 such entries, of 184 and 188), NF3 no better.
COARSE_FIRST = frozenset({2})

#: The repair pass of :func:`decompose_many` re-solves a config when a config with coarser
#: scales ended this much (relative) lower, by code bits: finer scales should not do worse.
#: Measured in session 11 on 14 SmolLM2 matrices (layers 0-1, lqlora space at rank 64, 1326
#: reference entries), against 0.01 for all: NF8 repairs triggered by a coarser config less
#: than 10% lower cost 3.5% of all quantization work (entries x size), succeeded 14 times of
#: 72 and moved no entry across 1.01x the reference's error (seed 0); NF3/NF4 repairs
#: triggered by a margin under 5% cost 3.3% and moved none either. With both margins (and :data:`NF8_STOP`,
#: NF3's :data:`TOL_FACTOR`), seeds 0/1/2: entries more than 1% above the reference 6/9/8
#: against 10/11/14, for 2.6% less work.
REPAIR_MARGIN = {3: 0.05, 4: 0.05, 8: 0.10}

#: The margin of code widths not in :data:`REPAIR_MARGIN` (if :data:`REPAIR_BITS` is widened).
DEFAULT_REPAIR_MARGIN = 0.01

#: Code widths that get the repair pass. Measured on the same 6 matrices: 49.7 s against
#: 38.9 s without it; entries more than 1% above the reference 13 against 18 (of 744), the
#: worst ratio 1.38 against 1.62, and geometric-mean ratios NF3 0.876 (0.890), NF4 0.812
#: (0.831), NF8 0.402 (0.411). NF2, solved from coarse up, gains little (0.969 -> 0.966 for
#: 4 s more).
REPAIR_BITS = frozenset({3, 4, 8})

#: Scale bits of the NF8 configs that the repair pass re-solves. Measured in session 10 with
#: :data:`NF8_STOP` on the 14 matrices named there (3 steps for 3-4 bit scales too), seeds 0/1:
#: repairing NF8 with 2-bit scales cost 1038 and 821 quantizations (of about 27400) and left
#: the NF8 entries more than 1% above the reference as they were (0 and 5);
#: repairing NF8's 8-bit scales cost 2% of the work (entries x size) and brought their
#: geometric-mean ratio to the reference from 0.57 to 0.53 (they stay far below it: at most
#: 0.97x without). Without any NF8 repair, NF8 with 4-bit scales ended up to 1.6x above the
#: reference.
REPAIR_NF8_SCALE_BITS = frozenset({3, 4})


def _repairable(cfg: QuantConfig) -> bool:
    """Whether the repair pass may re-solve ``cfg`` (:data:`REPAIR_BITS`,
    :data:`REPAIR_NF8_SCALE_BITS`)."""
    return cfg.bits in REPAIR_BITS and (cfg.bits != 8 or cfg.scale_bits in REPAIR_NF8_SCALE_BITS)


@functools.lru_cache(maxsize=1 << 16)  # pairs of configs, asked again for every matrix
def _coarser_scales(p: QuantConfig, c: QuantConfig) -> bool:
    """Whether ``p`` is ``c`` with scales no more precise (fewer or equal scale bits, equal or
    larger scale groups; the dtype of the second-level scales is not compared), p != c."""
    return (
        p != c
        and p.replace(scale_bits=c.scale_bits, scale_block=c.scale_block, scale_dtype=c.scale_dtype) == c
        and p.scale_bits <= c.scale_bits
        and p.scale_block >= c.scale_block
    )


@functools.lru_cache(maxsize=1 << 16)  # pairs of configs, asked again for every matrix
def _same_quantizer(a: QuantConfig, b: QuantConfig) -> bool:
    """Same Q (codes, blocks, scales), maybe another rank or factor storage."""
    return a.replace(rank=b.rank, lowrank_bits=b.lowrank_bits) == b


def _parent_distance(c: QuantConfig, p: QuantConfig) -> tuple[float, ...]:
    """How far a solved config ``p`` (same bits and block) is from ``c`` as a warm start."""
    return (
        0 if _same_quantizer(c, p) and p.rank >= c.rank else 1,
        0 if _is_twin(c, p) else 1,
        0 if p.rank >= c.rank else 1,
        abs(p.rank - c.rank),
        abs(math.log2(p.scale_bits) - math.log2(c.scale_bits)),
        abs(math.log2(p.scale_block) - math.log2(c.scale_block)),
        int(p.scale_dtype != c.scale_dtype),
        int(p.lowrank_bits != c.lowrank_bits),
    )


def _repair(
    m: _Matrix, cfgs: list[QuantConfig], order: list[int], out: list[Any], opts: Any
) -> None:
    """Re-solve each config that ended above a config with coarser scales, from its factors.

    Coarse scales (2-4 bits over large groups) clip many weights, and the descent from a
    finer config's optimum can stall well above what the coarser config reached. Only configs
    that :func:`_repairable` allows are re-solved, and only when the coarser config ended at
    least :data:`REPAIR_MARGIN` [bits] lower. Configs are visited from the coarsest up,
    so a repaired config can in turn repair finer ones; the new result is kept only if it is
    lower.
    """
    for i in reversed(order):
        cfg, cur = cfgs[i], out[i]
        if not _repairable(cfg):
            continue
        margin = REPAIR_MARGIN.get(cfg.bits, DEFAULT_REPAIR_MARGIN)
        lower = [
            out[j] for j in order
            if j != i and _coarser_scales(cfgs[j], cfg)
            and out[j].objective < (1 - margin) * cur.objective
        ]
        if not lower:
            continue
        start = min(lower, key=lambda d: d.objective)
        d = _solve(m, cfg, start, opts(cfg))
        if d.objective < cur.objective:
            log.debug("%s repaired from %s: %.6g -> %.6g", cfg.name, start.cfg.name, cur.objective, d.objective)
            out[i] = d


def _restart(m: _Matrix, cfg: QuantConfig, first: Decomposition, opts: _Opts) -> Decomposition:
    """The lowest of ``first`` (a cold start) and :data:`LEADER_STARTS` [bits] - 1 more cold
    starts with other sketches (none where every step is an exact SVD: they would repeat it)."""
    rows, cols = m.W.shape
    if _use_exact_svd(rows, cols, min(cfg.rank + opts.oversample, rows, cols)):
        return first
    best, kept = first, m.last_target
    for stream in range(1, LEADER_STARTS.get(cfg.bits, 1)):
        d = _solve(m, cfg, None, replace(opts, stream=stream))
        if d.objective < best.objective:
            best, kept = d, m.last_target
    m.last_target = kept  # the twin reuses the product of the kept factors
    return best


@torch.no_grad()
def decompose_many(
    W: torch.Tensor,
    cfgs: Sequence[QuantConfig],
    fisher: torch.Tensor | None = None,
    *,
    share: bool = True,
    max_iters: int = DEFAULT_MAX_ITERS,
    tol: float = DEFAULT_MANY_TOL,
    twin_iters: int = 0,
    relax: float | None = None,
    momentum: float | None = None,
    warm_subspace: bool = True,
    cheap_stop: bool = False,
    oversample: int = DEFAULT_MANY_OVERSAMPLE,
    power_iters: int = 2,
    seed: int = 0,
    repair: bool = True,
) -> list[Decomposition]:
    """Decompose one matrix for many configs, sharing work; results in the order of ``cfgs``.

    Configs are grouped by their codes (bits, block). In each group the *leader* (highest rank,
    bf16 factors, most precise block scales; for NF2 the least precise, see
    :data:`COARSE_FIRST`) runs the loop from a cold start (NF2's from three, the lowest kept:
    :data:`LEADER_STARTS`); the others follow in order of
    scale precision (each fp16 twin next to its fp32 sibling, whose factors' product it
    reuses), each warm-started from the nearest config solved before it: the same quantizer
    at a higher rank (factors trimmed: the rank-r part of its SVD of W - Q), else its
    fp16/fp32 *twin* (same codes, scale bits and groups; ``twin_iters`` more steps, 0 = just
    quantize against the twin's factors), else the config with the nearest scale bits and
    groups. 2-bit scales of NF3-NF8 start cold instead of from a non-twin (its optimum is a
    poor start there), see :func:`_warm_plan`. Every cold start shares one first step, the
    exact top-r part of W. With ``repair`` (NF3, NF4, and NF8 with 3-4 bit scales:
    :func:`_repairable`), a config that ended above a config with coarser scales (by 5% for
    NF3/NF4, 10% for NF8: :data:`REPAIR_MARGIN`) is solved again from that config's factors
    (:func:`_repair`), and the lower result kept.
    ``tol`` defaults looser than :func:`decompose`'s, and the subspace passes carry no extra
    columns (``oversample``, :data:`DEFAULT_MANY_OVERSAMPLE`). With ``share=False`` every
    config is solved alone from a cold start, exactly as :func:`decompose` does with the same
    ``tol`` and ``oversample``.
    """
    cfgs = list(cfgs)
    m = _Matrix(W, fisher, seed)
    for cfg in cfgs:
        _check_rank(cfg, m.W)

    def opts(cfg: QuantConfig, iters: int) -> _Opts:
        return _Opts(
            iters, warm_subspace=warm_subspace, cheap_stop=cheap_stop, oversample=oversample,
            power_iters=power_iters, **_step_opts(cfg, relax, momentum), **_stop_opts(cfg, tol),
        )

    out: list[Decomposition | None] = [None] * len(cfgs)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.rank == 0 or not share:
            out[i] = _solve(m, cfg, None, opts(cfg, max_iters))
        else:
            groups.setdefault((cfg.bits, cfg.block), []).append(i)
    for key in sorted(groups):
        sign = -1 if key[0] in COARSE_FIRST else 1
        order = sorted(
            groups[key],
            key=lambda i: (
                cfgs[i].rank, cfgs[i].lowrank_bits, tuple(sign * x for x in _scale_precision(cfgs[i])),
            ),
            reverse=True,
        )
        solved: list[Decomposition] = []
        for i in order:
            cfg = cfgs[i]
            parent = min(solved, key=lambda p: _parent_distance(cfg, p.cfg)) if solved else None
            parent, iters = _warm_plan(cfg, parent, max_iters, twin_iters)
            d = _solve(m, cfg, parent, opts(cfg, iters))
            if not solved:  # the leader: maybe more cold starts (LEADER_STARTS)
                d = _restart(m, cfg, d, opts(cfg, iters))
            out[i] = d
            solved.append(d)
        if repair and key[0] in REPAIR_BITS:
            _repair(m, cfgs, order, out, lambda cfg: opts(cfg, max_iters))
    log.debug("decompose_many: %d configs of a %dx%d matrix", len(cfgs), *m.W.shape)
    return [d for d in out if d is not None]
