"""NormalFloat (NF) codebooks and nearest-level encoding.

QLoRA's NF4 construction generalized to ``b`` bits: with ``n = 2**b`` levels, ``n/2``
positive levels and ``n/2 - 1`` negative levels are standard-normal quantiles at evenly
spaced probabilities between ``offset`` and 1/2, plus an exact zero; everything is divided
by the largest level so the codebook spans exactly [-1, 1].

Encoding (nearest level = the number of midpoints below ``y``, ``torch.bucketize``'s rule)
uses a lookup table instead of a binary search per element, which is slow on CPU: [-1, 1] is
cut into ``_LUT_BINS`` equal bins (edges exactly representable), each holding at most one
midpoint, so ``code = base[bin] + (y > midpoint_in[bin])``. The result equals the binary
search bit for bit (see :func:`_build_lut` for why float rounding of the bin cannot change it).
"""

from __future__ import annotations

import torch

from bitalloc.configs import NF_BITS

_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
_LUT_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor] | None] = {}
_ROUND_CACHE: dict[tuple[int, torch.device], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
#: Bins of the encoding lookup table over [-1, 1] (a power of two: bin edges are exact floats).
_LUT_BINS = 4096
#: A midpoint must lie this far below the next bin edge (or exactly on an edge); see _build_lut.
_LUT_MARGIN = 1e-6


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


def _build_lut(midpoints: torch.Tensor, n: int = _LUT_BINS) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(base, threshold)`` tables for encoding, or None when the grid does not fit.

    Bin ``j`` covers ``[e_j, e_{j+1})`` with ``e_j = j / (n/2) - 1``; ``base[j]`` counts the
    midpoints ``< e_j`` and ``threshold[j]`` is the one midpoint in the bin (+inf if none).
    The bin of ``y`` is computed as ``floor(fl(y + 1) * n/2)``: ``fl`` is monotone and the
    edges are exact, so ``y >= e`` always lands at or above e's bin, and the only possible
    slip is a ``y`` a rounding error (< 1e-7) below an edge landing in the bin above, where
    the code is still right unless a midpoint lies in between. So the table is used only if
    every midpoint is exactly on an edge or more than ``_LUT_MARGIN`` below the next one.
    """
    half = n // 2
    m = midpoints.to(torch.float64)
    pos = (m + 1) * half
    bins = torch.floor(pos).long()
    if int(torch.bincount(bins, minlength=n).max()) > 1:
        return None
    gap = (bins + 1 - pos) / half  # distance to the next edge above
    on_edge = pos == torch.floor(pos)
    if not bool((on_edge | (gap > _LUT_MARGIN)).all()):
        return None
    edges = (torch.arange(n, dtype=torch.float64) / half - 1).to(torch.float32)
    base = torch.searchsorted(midpoints.cpu(), edges, right=False)  # midpoints < edge
    threshold = torch.full((n,), float("inf"), dtype=torch.float32)
    threshold[bins] = midpoints.cpu()
    return base.to(torch.int64), threshold


def _lut(bits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    key = (bits, device)
    if key not in _LUT_CACHE:
        _, midpoints = _cached(bits, "cpu")
        lut = _build_lut(midpoints)
        _LUT_CACHE[key] = None if lut is None else (lut[0].to(device), lut[1].to(device))
    return _LUT_CACHE[key]


def nf_encode_index(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Like :func:`nf_encode` but int64 codes (ready to index with); ``y`` float32."""
    _check_bits(bits)
    y = y.to(torch.float32)
    lut = _lut(bits, y.device)
    if lut is None:  # never for the built-in codebooks; kept as the definition
        _, midpoints = _cached(bits, y.device)
        return torch.bucketize(y.contiguous(), midpoints)
    base, threshold = lut
    flat = y.reshape(-1)
    idx = _lut_bins(flat)
    codes = base.index_select(0, idx)
    codes += flat > threshold.index_select(0, idx)
    return codes.view(y.shape)


def _lut_bins(flat: torch.Tensor) -> torch.Tensor:
    """The lookup-table bin of each element of a flat float32 tensor (see :func:`_build_lut`).

    ``fl(y + 1) * n/2`` equals ``fl(y * n/2 + n/2)`` (scaling by a power of two is exact),
    and clamping to ``[0, n - 1]`` before truncating equals clamping y to [-1, 1] first.
    """
    half = _LUT_BINS // 2
    return (flat * half).add_(half).clamp_(0, _LUT_BINS - 1).to(torch.int64)


def round_tables(
    bits: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(below, above, threshold)`` per lookup-table bin: the levels either side of the bin's
    midpoint and the midpoint itself (+inf if none); None when the table does not fit."""
    device = torch.device(device)
    key = (bits, device)
    tables = _ROUND_CACHE.get(key)
    if tables is None:
        lut = _lut(bits, device)
        if lut is None:
            return None
        levels, _ = _cached(bits, device)
        base, threshold = lut
        tables = _ROUND_CACHE[key] = (
            levels[base], levels[(base + 1).clamp_(max=levels.numel() - 1)], threshold,
        )
    return tables


def nf_round(y: torch.Tensor, bits: int) -> torch.Tensor:
    """The NF level nearest to each element of ``y`` (float32, same shape).

    Equal, bit for bit, to ``nf_decode(nf_encode(y, bits), bits)``, without the integer codes:
    each lookup-table bin holds the level below its midpoint, the level above it and the
    midpoint, so one comparison picks the level (the decomposition loop needs only values).
    """
    _check_bits(bits)
    y = y.to(torch.float32)
    tables = round_tables(bits, y.device)
    if tables is None:  # never for the built-in codebooks; kept as the definition
        return nf_decode(nf_encode_index(y, bits), bits)
    below, above, threshold = tables
    flat = y.reshape(-1)
    idx = _lut_bins(flat)
    out = torch.where(flat > threshold.index_select(0, idx), above.index_select(0, idx),
                      below.index_select(0, idx))
    return out.view(y.shape)


def nf_encode(y: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes (uint8, same shape) of the NF levels nearest to ``y``; beyond ±1 clamps to the ends.

    Exact zeros map to :func:`nf_zero_code`. ``y`` must be floating point and free of NaN.
    Equal to ``torch.bucketize(y, midpoints)`` (ties go to the lower level).
    """
    return nf_encode_index(y, bits).to(torch.uint8)


def nf_decode(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 NF levels of ``codes`` (any integer dtype, same shape)."""
    levels, _ = _cached(bits, codes.device)
    return levels.index_select(0, codes.reshape(-1).long()).view(codes.shape)
