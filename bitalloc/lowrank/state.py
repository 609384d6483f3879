"""What the loop works on and hands back: validated input, per-matrix state, the result.

:class:`Matrix` holds one validated matrix in float32 with its Fisher weights and what every
config of it shares (the cold start's SVD of W, the last result's product of its factors).
:class:`Decomposition` is the public result.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from bitalloc.configs import QuantConfig
from bitalloc.quant import QuantizedTensor, kernels, quantize

log = logging.getLogger(__name__)

__all__ = ["Decomposition", "Matrix", "fisher_scalings", "check_rank", "keep_freed_memory", "minus_low"]


def minus_low(W: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """``W - l1 @ l2`` as one fused product (no separate ``l1 @ l2`` and subtraction pass)."""
    return torch.addmm(W, l1, l2, alpha=-1.0)


class DeferredQ:
    """``quantize(W - L1 @ L2, cfg)``, computed on first access of ``Decomposition.q``.

    Profiling needs only the errors; packing Q for each of hundreds of configs would cost as
    much as a step of the loop. The product is recomputed from the very tensors the loop used,
    with the same operations, so Q equals the one that was evaluated.
    """

    __slots__ = ("W", "l1", "l2", "cfg")

    def __init__(self, W: torch.Tensor, l1: torch.Tensor, l2: torch.Tensor, cfg: QuantConfig) -> None:
        self.W, self.l1, self.l2, self.cfg = W, l1, l2, cfg

    def __call__(self) -> QuantizedTensor:
        return quantize(minus_low(self.W, self.l1, self.l2), self.cfg)


@dataclass
class Decomposition:
    """``W ≈ Q + L1 @ L2`` for one config; ``l1``/``l2`` are float32 and equal the stored values.

    ``error`` is ``||W - (Q + L1 L2)||_F^2``; ``error_fisher`` the ``sqrt(F)``-weighted one when a
    Fisher estimate was given (else None). ``iterations`` counts rank-r steps taken (0 for rank
    0 or an ``init`` that was kept as it was); ``history`` the objective after each iterate
    (the warm start first, when there is one). ``l1_q``/``l2_q`` hold the NF8-quantized
    factors (``L1`` transposed) when ``cfg.lowrank_bits == 8``. ``q`` may be handed over as a
    :class:`DeferredQ` and is then quantized on first access.
    """

    cfg: QuantConfig
    q: QuantizedTensor
    l1: torch.Tensor
    l2: torch.Tensor
    error: float
    error_fisher: float | None
    iterations: int
    history: list[float] = field(default_factory=list)
    l1_q: QuantizedTensor | None = None
    l2_q: QuantizedTensor | None = None
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


def _get_q(self: Decomposition) -> QuantizedTensor:
    q = self.__dict__["_q"]
    if isinstance(q, DeferredQ):
        q = self.__dict__["_q"] = q()
    return q


def _set_q(self: Decomposition, value: Any) -> None:
    self.__dict__["_q"] = value


# ``q`` is quantized lazily (see DeferredQ); to its readers it is a plain field.
Decomposition.q = property(_get_q, _set_q, doc="Q, the quantized part (a QuantizedTensor).")  # type: ignore[assignment]


# ----- validation ------------------------------------------------------------------------------
def check_matrix(W: Any) -> torch.Tensor:
    """W itself, or a ValueError saying why it is not a finite floating-point matrix."""
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


def check_fisher(fisher: Any, W: torch.Tensor) -> torch.Tensor | None:
    """The Fisher estimate as float32 on W's device, or a ValueError saying what is wrong."""
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


def check_rank(cfg: Any, W: torch.Tensor) -> None:
    """A ValueError unless ``cfg`` is a QuantConfig whose rank fits W."""
    if not isinstance(cfg, QuantConfig):
        raise ValueError(f"expected a QuantConfig, got {type(cfg).__name__}")
    rows, cols = W.shape
    if cfg.rank > min(rows, cols):
        raise ValueError(
            f"rank {cfg.rank} (config {cfg.name}) exceeds min(rows, cols) = {min(rows, cols)} "
            f"of a {rows}x{cols} matrix"
        )


def fisher_scalings(F: torch.Tensor, floor: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column weights ``(d_r, d_c)`` (shapes rows x 1, 1 x cols) of a Fisher estimate.

    ``d_r = sqrt(mean of F over columns)``, ``d_c = sqrt(mean of F over rows)``, each floored at
    ``floor`` times its maximum (all-zero F gives uniform weights).
    """

    def floored(m: torch.Tensor) -> torch.Tensor:
        top = float(m.max())
        if top <= 0:
            return torch.ones_like(m)
        return m.clamp_min(floor * top).sqrt()

    return floored(F.mean(dim=1, keepdim=True)), floored(F.mean(dim=0, keepdim=True))


# ----- the process -----------------------------------------------------------------------------
_MALLOC_TUNED = False


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse (once per process; a no-op off glibc).

    Each step of the loop allocates and frees several matrix-sized temporaries; with glibc's
    defaults a freed block of a few MB goes back to the OS and the next allocation page-faults
    it in again. This raises the trim threshold to 1 GiB and fixes the mmap threshold at 32 MiB.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if not name:
            return
        mallopt = getattr(ctypes.CDLL(name), "mallopt", None)
        if mallopt is None:
            return
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        mallopt(M_TRIM_THRESHOLD, 1 << 30)
        mallopt(M_MMAP_THRESHOLD, 32 << 20)
    except (OSError, AttributeError):  # not glibc, or no libc found: keep the defaults
        pass


# ----- one matrix --------------------------------------------------------------------------------
class Matrix:
    """One validated matrix in float32, with its Fisher weights and what its configs share."""

    def __init__(self, W: torch.Tensor, fisher: torch.Tensor | None, seed: int, *,
                 fisher_floor: float = 1e-6, tune_malloc: bool = True) -> None:
        self.orig = check_matrix(W)
        self.W = W.detach().float()
        if tune_malloc and self.W.device.type == "cpu":
            keep_freed_memory()
        self.F = check_fisher(fisher, W)
        if self.F is not None:
            self.d_r, self.d_c = fisher_scalings(self.F, fisher_floor)
        else:
            self.d_r = self.d_c = None
        self.seed = seed
        # the first rank-r step of every cold start is the same (top-r of W): computed once
        self.cold: dict[Any, tuple[Any, ...]] = {}
        # the last result with bf16 factors and W minus the product of its factors: a twin or
        # a warm start from it evaluates the same factors first, so the product need not be redone
        self.last_target: tuple[Decomposition, torch.Tensor] | None = None
        self.quantizations = 0  # of the whole matrix, counted by the loop (a deterministic work count)

    def target_of(self, init: Any, cfg: QuantConfig) -> torch.Tensor | None:
        """``W - L1 @ L2`` of ``init``'s stored factors if it is the last result, of the same
        rank and, like ``cfg``, with bf16 factors (storing them again changes nothing); else None."""
        last = self.last_target  # only ever set for results with bf16 factors
        if last is None or last[0] is not init or cfg.lowrank_bits != 16 or init.rank != cfg.rank:
            return None
        return last[1]

    def generator(self) -> torch.Generator:
        """A generator seeded from ``seed`` (every run of the loop draws the same sketches)."""
        gen = torch.Generator(device=self.W.device)
        gen.manual_seed(self.seed)
        return gen

    def errors(self, E: torch.Tensor) -> tuple[float, float | None]:
        """Plain and Fisher-weighted squared Frobenius norms of a residual ``E``."""
        if self.F is None and kernels.applies(E):
            return kernels.sum_squares(E.contiguous()), None
        E2 = E * E
        plain = float(E2.sum(dtype=torch.float64))
        if self.F is None:
            return plain, None
        return plain, float((self.F * E2).sum(dtype=torch.float64))
