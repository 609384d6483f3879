"""NormalFloat (NF) codebooks and nearest-level encoding.

QLoRA's NF4 construction generalized to ``b`` bits: with ``n = 2**b`` levels, ``n/2``
positive levels and ``n/2 - 1`` negative levels are standard-normal quantiles at evenly
spaced probabilities between ``offset`` and 1/2, plus an exact zero; everything is divided
by the largest level so the codebook spans exactly [-1, 1].
"""

from __future__ import annotations

import torch

from bitalloc.configs import NF_BITS

_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in NF_BITS:
        raise ValueError(f"NF codebooks exist for bits in {NF_BITS}, got {bits!r}")


def nf_offset(bits: int) -> float:
    """The top probability of the NF-``bits`` construction (0.9677083 for NF4)."""
    _check_bits(bits)
    n = 2**bits
    return ((1 - 1 / (2 * (n - 1))) + (1 - 1 / (2 * n))) / 2


def _build_codebook(bits: int) -> torch.Tensor:
    n = 2**bits
    offset = nf_offset(bits)
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, n // 2 + 1, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, n // 2, dtype=torch.float64)[:-1])
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive])
    levels = torch.sort(levels / levels.max()).values.to(torch.float32)
    # Pin the ends exactly (they already are, up to float64 rounding of ppf/ppf).
    levels[0], levels[-1] = -1.0, 1.0
    return levels


def _cached(bits: int, device: torch.device | str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(levels, midpoints) for ``bits`` on ``device``, built once per pair."""
    _check_bits(bits)
    device = torch.device(device if device is not None else "cpu")
    key = (bits, device)
    entry = _CACHE.get(key)
    if entry is None:
        levels = _build_codebook(bits)
        midpoints = (levels[1:] + levels[:-1]) / 2
        entry = (levels.to(device), midpoints.to(device))
        _CACHE[key] = entry
    return entry


def nf_codebook(bits: int, device: torch.device | str | None = None) -> torch.Tensor:
    """The ``2**bits`` sorted float32 NF levels in [-1, 1] (exact 0, ends exactly -1 and +1)."""
    return _cached(bits, device)[0].clone()


def nf_zero_code(bits: int) -> int:
    """The code of the exact-zero level (``2**bits / 2 - 1``: one fewer negative level)."""
    _check_bits(bits)
    return 2 ** (bits - 1) - 1


def nf_encode(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8, same shape) of the NF levels nearest to ``y``; beyond ±1 clamps to the ends.

    Exact zeros map to :func:`nf_zero_code`. ``y`` must be floating point and free of NaN.
    """
    _, midpoints = _cached(bits, y.device)
    return torch.bucketize(y.to(torch.float32).contiguous(), midpoints, out_int32=True).to(torch.uint8)


def nf_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 NF levels of ``codes`` (any integer dtype, same shape)."""
    levels, _ = _cached(bits, codes.device)
    return levels[codes.long()]
