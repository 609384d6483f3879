"""The rank-r step: the balanced factors of the top-r part of a (Fisher-weighted) target.

A warm step is one subspace-iteration pass from the previous step's right subspace,
orthonormalized through a Cholesky factor of its Gram matrix, with the small SVD from the
eigendecomposition of a k x k Gram matrix; a cold sketch draws Gaussian columns and runs power
iterations; an exact SVD is taken where that is cheaper. On large matrices with native
bfloat16 products the target stays split (:class:`SplitTarget`). The first step of a cold start
is the top-r part of W itself, computed once per matrix (:func:`cold_factors`).
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from bitalloc.configs import LOWRANK_NF8, QuantConfig
from bitalloc.lowrank.policy import LoopPolicy
from bitalloc.lowrank.state import Matrix
from bitalloc.quant import QuantizedTensor, quantize

__all__ = ["SplitTarget", "cold_factors", "factors", "step_target", "store", "top_subspace",
           "use_exact_svd", "range_svd", "small_svd", "native_bf16", "cpu_has_bf16", "orth"]

#: The Cholesky pass gives up (and a Householder QR runs) below this ratio of the smallest to
#: the largest diagonal entry of the Cholesky factor: Q would no longer be orthonormal.
CHOLESKY_MIN_RATIO = 1e-5
#: Directions with a singular value below this fraction of the largest are dropped (zero
#: columns of V): their weight in the factors is zero anyway.
SINGULAR_FLOOR = 1e-7

Target = Any  # torch.Tensor | SplitTarget


# ----- the hardware ------------------------------------------------------------------------------
def cpu_has_bf16(cpuinfo: str) -> bool:
    """Whether a Linux ``/proc/cpuinfo`` lists x86 bfloat16 instructions (AVX512-BF16, AMX)."""
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def native_bf16(device_type: str, index: int | None = None) -> bool:
    """Whether bfloat16 matrix products run natively on this device: a CUDA device of compute
    capability 8.0 or above, or a CPU that :func:`cpu_has_bf16` (read once per process; a
    fixed answer, so a profile's numbers do not depend on a timing)."""
    if device_type == "cuda":
        return torch.cuda.get_device_capability(index)[0] >= 8
    if device_type == "cpu":
        try:
            with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
                return cpu_has_bf16(f.read())
        except OSError:
            return False
    return False


# ----- the step's target -------------------------------------------------------------------------
class SplitTarget:
    """A target ``sum_i c_i A1_i @ A2_i + eta * D`` kept split.

    Each ``(c_i, A1_i, A2_i)`` is a low-rank term in float32 factors (rows x r, r x cols), ``D``
    the dense part. ``T @ V`` and ``Y^T T`` cost thin products with the factors and one
    bfloat16 product with ``D`` (float32 sums); :meth:`dense` forms the matrix.
    """

    __slots__ = ("terms", "eta", "D", "_D_low")

    def __init__(self, terms: list[tuple[float, torch.Tensor, torch.Tensor]], eta: float, D: torch.Tensor) -> None:
        self.terms, self.eta, self.D = terms, eta, D
        self._D_low: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        return self.D.shape

    def weighted(self, d_r: torch.Tensor, d_c: torch.Tensor) -> "SplitTarget":
        """``diag(d_r) T diag(d_c)``, still split."""
        terms = [(c, d_r * A1, A2 * d_c) for c, A1, A2 in self.terms]
        return SplitTarget(terms, self.eta, d_r * self.D * d_c)

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


def step_target(W: torch.Tensor, cur: Any, prev: Any, eta: float, momentum: float, policy: LoopPolicy) -> Target:
    """``L + eta (W - L - Q) + momentum (L - L_prev)`` of the iterate ``cur`` (``prev`` None: no
    momentum), as a :class:`SplitTarget` where the policy and the hardware (native bfloat16
    products) allow, else dense.

    An iterate has ``l1``, ``l2`` (stored factors), ``target = W - l1 @ l2`` and
    ``resid = W - l1 @ l2 - Q``.
    """
    D = cur.resid
    if not policy.split_target or not native_bf16(D.device.type, D.device.index):
        step = torch.add(W - cur.target, D, alpha=eta)  # L = W - (W - L)
        if prev is not None:  # L - L_prev = (W - L_prev) - (W - L)
            step = step + momentum * (prev.target - cur.target)
        return step
    if prev is None:
        return SplitTarget([(1.0, cur.l1, cur.l2)], eta, D)
    return SplitTarget([(1.0 + momentum, cur.l1, cur.l2), (-momentum, prev.l1, prev.l2)], eta, D)


def _mm(R: Target, V: torch.Tensor) -> torch.Tensor:
    return R.matmul(V) if isinstance(R, SplitTarget) else R @ V


def _tmm(Y: torch.Tensor, R: Target) -> torch.Tensor:
    return R.rmatmul_t(Y) if isinstance(R, SplitTarget) else Y.T @ R


def _dense(R: Target) -> torch.Tensor:
    return R.dense() if isinstance(R, SplitTarget) else R


# ----- the top-r SVD -----------------------------------------------------------------------------
def orth(x: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of x's columns (Householder QR)."""
    return torch.linalg.qr(x, mode="reduced")[0]


def use_exact_svd(rows: int, cols: int, k: int, max_size: int) -> bool:
    """Exact SVD when a k-column sketch would cover half the smaller side, or the matrix is tiny."""
    return 2 * k >= min(rows, cols) or rows * cols <= max_size


def top_subspace(
    R: Target, r: int, basis: torch.Tensor | None, *, oversample: int, power_iters: int,
    gen: torch.Generator, cholesky_qr: bool = True, exact_max_size: int = 128 * 128,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Top-r SVD ``(U, S, V)`` of R, and the k right vectors to warm-start the next call with.

    Cold (``basis is None``): a Gaussian sketch of k = r + oversample columns and
    ``power_iters`` power iterations. Warm: one subspace-iteration pass from ``basis``.
    """
    rows, cols = R.shape
    k = min(r + oversample, rows, cols)
    if use_exact_svd(rows, cols, k, exact_max_size):
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
    if passes == 0 and cholesky_qr:
        found = range_svd(R, Y, r)
        if found is not None:
            return found
    Y = orth(Y)
    for _ in range(passes):
        Y = orth(R @ orth(R.T @ Y))
    Ub, S, V = small_svd(_tmm(Y, R))
    return Y @ Ub[:, :r], S[:r], V[:, :r], V


def range_svd(R: Target, Y: torch.Tensor, r: int) -> tuple[torch.Tensor, ...] | None:
    """Top-r ``(U, S, V)`` of R projected on the column space of Y (rows x k), and all k V's.

    With ``C C^T = Y^T Y`` (float64, k x k), ``Q = Y C^-T`` is orthonormal and
    ``Q^T R = C^-1 Y^T R``, whose SVD comes from its k x k Gram matrix as in :func:`small_svd`.
    None when Y is too ill-conditioned for that (the caller then orthonormalizes Y).
    Y's Gram matrix is float64 (Q must be orthonormal); that of ``B = Y^T R`` and its
    eigendecomposition are float32: for any orthogonal eigenvector matrix E the product
    ``U S V^T`` is ``Q Q^T R``, so their rounding moves only the balance of the factors and
    which k - r directions are dropped.
    """
    Y64 = Y.double()
    C, info = torch.linalg.cholesky_ex(Y64.T @ Y64)
    diag = C.diagonal()
    if int(info) != 0 or not bool(diag.min() > CHOLESKY_MIN_RATIO * diag.max()):
        return None
    B = _tmm(Y, R)  # k x n
    left = torch.linalg.solve_triangular(C, (B @ B.T).double(), upper=False)  # C^-1 (B B^T)
    gram = torch.linalg.solve_triangular(C, left.T, upper=False)  # C^-1 B B^T C^-T (symmetric)
    S, evecs, keep = _gram_singular((gram + gram.T) / 2, dtype=torch.float32)
    T = torch.linalg.solve_triangular(C.T, evecs, upper=True)  # C^-T E: U = Y T
    # V = B^T T / S (zero columns where not kept) as one product, (T^T B)^T: faster for a wide B
    V = ((T * (keep / torch.where(keep, S, 1.0))).to(Y.dtype).T @ B).T
    U = Y @ T[:, :r].to(Y.dtype)
    return U, S[:r].to(Y.dtype), V[:, :r], V


def _gram_singular(gram: torch.Tensor, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """Singular values (descending), left vectors and kept mask from a k x k Gram matrix.

    The eigendecomposition runs in ``dtype`` (default: the Gram matrix's own); the results
    are in the Gram matrix's dtype.
    """
    evals, evecs = torch.linalg.eigh(gram if dtype is None else gram.to(dtype))
    evals, evecs = evals.to(gram.dtype).flip(0), evecs.to(gram.dtype).flip(1)
    S = evals.clamp_min(0).sqrt()
    keep = S > SINGULAR_FLOOR * S[0].clamp_min(torch.finfo(torch.float64).tiny)
    return S, evecs, keep


def small_svd(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of a wide k x n matrix from the eigenvectors of its k x k Gram matrix.

    In float64, so the squared singular values keep their precision; several times faster
    than a full SVD of B on the CPU.
    """
    B64 = B.double()
    S, evecs, keep = _gram_singular(B64 @ B64.T)
    V = (evecs.T @ B64).T / torch.where(keep, S, 1.0) * keep
    return evecs.to(B.dtype), S.to(B.dtype), V.to(B.dtype)


# ----- factors -----------------------------------------------------------------------------------
def balanced(m: Matrix, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``L1 = U sqrt(S)``, ``L2 = sqrt(S) V^T``, with the Fisher weights divided back out."""
    s = S.clamp_min(0).sqrt()
    L1 = U * s
    L2 = (V * s).T
    if m.d_r is not None:
        L1 = L1 / m.d_r
        L2 = L2 / m.d_c
    return L1, L2.contiguous()


def factors(
    m: Matrix, R: Target, r: int, basis: torch.Tensor | None, policy: LoopPolicy, gen: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Balanced factors of R's top-r part (Fisher-weighted), and the subspace for the next step."""
    if m.d_r is not None:
        R = R.weighted(m.d_r, m.d_c) if isinstance(R, SplitTarget) else m.d_r * R * m.d_c
    U, S, V, basis = top_subspace(
        R, r, basis if policy.warm_subspace else None, oversample=policy.oversample,
        power_iters=policy.power_iters, gen=gen, cholesky_qr=policy.cholesky_qr,
        exact_max_size=policy.exact_svd_max_size,
    )
    return (*balanced(m, U, S, V), basis)


Stored = tuple[torch.Tensor, torch.Tensor, QuantizedTensor | None, QuantizedTensor | None]


def store(L1: torch.Tensor, L2: torch.Tensor, cfg: QuantConfig) -> Stored:
    """The factors as the config stores them (bf16-rounded or NF8-decoded), as float32."""
    if cfg.lowrank_bits == 16:
        return L1.bfloat16().float(), L2.bfloat16().float(), None, None
    q1 = quantize(L1.T.contiguous(), LOWRANK_NF8)
    q2 = quantize(L2.contiguous(), LOWRANK_NF8)
    return q1.dequantize().float().T.contiguous(), q2.dequantize().float(), q1, q2


# ----- the first step of a cold start ------------------------------------------------------------
def cold_factors(m: Matrix, r: int, policy: LoopPolicy, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor | None]:
    """The first rank-r step of a cold start (from ``Q = 0``): the top-r part of W.

    The same for every config, so computed once per matrix. With ``policy.exact_cold`` it is
    the exact (:func:`_top_of_w`) SVD of (the Fisher-weighted) W, and no basis is handed on:
    W's top subspace is a poor start for the SVD of W - Q, so the second step sketches afresh.
    Otherwise it is the randomized sketch of the later steps, with ``gen`` left in the state
    computing it would leave.
    """
    if policy.exact_cold:
        U, S, V = _top_of_w(m, r, policy)
        return (*balanced(m, U[:, :r], S[:r], V[:, :r]), None)
    key = (r, policy.oversample, policy.power_iters)
    if key not in m.cold:
        L1, L2, basis = factors(m, m.W, r, None, policy, gen)
        m.cold[key] = (L1, L2, basis, gen.get_state())
    L1, L2, basis, state = m.cold[key]
    gen.set_state(state)
    return L1, L2, basis


def _top_of_w(m: Matrix, r: int, policy: LoopPolicy) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(U, S, V)`` of (the Fisher-weighted) W, accurate in at least the top r columns: an exact
    SVD up to ``policy.cold_exact_max_side``, else a subspace iteration with 2r columns."""
    cached = m.cold.get("top")
    if cached is not None and cached[3] >= r:
        return cached[:3]
    R = m.W if m.d_r is None else m.d_r * m.W * m.d_c
    if min(R.shape) <= policy.cold_exact_max_side:
        U, S, Vh = torch.linalg.svd(R, full_matrices=False)
        top = (U, S, Vh.T, S.numel())
    else:
        U, S, V, _ = top_subspace(R, r, None, oversample=r, power_iters=policy.cold_power_iters,
                                  gen=m.generator(), cholesky_qr=policy.cholesky_qr,
                                  exact_max_size=policy.exact_svd_max_size)
        top = (U, S, V, r)
    m.cold["top"] = top
    return top[:3]
