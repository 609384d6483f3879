"""Dense bit packing of small unsigned codes into bytes.

Code ``i`` of width ``w`` occupies bits ``[i*w, (i+1)*w)`` of a little-endian bitstream, where
stream bit ``k`` is bit ``k % 8`` (least significant first) of byte ``k // 8``; codes cross
byte boundaries when ``w`` does not divide 8. ``n`` codes take exactly ``ceil(n*w/8)`` bytes.

Eight codes make exactly ``w`` bytes, so the work is done on groups of eight codes held in
one int64 (at most 56 bits for ``w <= 7``; ``w == 8`` is a plain copy), a chunk at a time to
bound temporary memory.
"""

from __future__ import annotations

import torch

#: Codes handled per chunk (a multiple of 8, so chunks start on byte boundaries).
_CHUNK_CODES = 1 << 22


def packed_nbytes(n: int, width: int) -> int:
    """Bytes that ``n`` codes of ``width`` bits take: ``ceil(n*width/8)``."""
    _check_width(width)
    if n < 0:
        raise ValueError(f"the number of codes must be >= 0, got {n}")
    return -(-n * width // 8)


def _check_width(width: int) -> None:
    if isinstance(width, bool) or not isinstance(width, int) or not 1 <= width <= 8:
        raise ValueError(f"bit width must be an int in 1..8, got {width!r}")


def _check_codes(codes: torch.Tensor, width: int) -> None:
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype == torch.bool or codes.is_floating_point() or codes.is_complex():
        raise ValueError(f"codes must have an integer dtype (uint8), got {codes.dtype}")
    if codes.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(codes))
    if lo < 0 or hi >= 1 << width:
        raise ValueError(
            f"codes must lie in [0, {(1 << width) - 1}] for width {width}, "
            f"got values in [{lo}, {hi}]"
        )


def pack_bits(codes: torch.Tensor, width: int) -> torch.Tensor:
    """Pack codes (any shape, values < 2**width) into a 1-D uint8 tensor on the same device."""
    _check_width(width)
    _check_codes(codes, width)
    flat = codes.reshape(-1)
    n = flat.numel()
    if width == 8:
        return flat.to(torch.uint8, copy=True)
    n_bytes = packed_nbytes(n, width)
    out = torch.empty(n_bytes, dtype=torch.uint8, device=flat.device)
    code_shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * width
    byte_shifts = torch.arange(width, device=flat.device, dtype=torch.int64) * 8
    for start in range(0, n, _CHUNK_CODES):
        part = flat[start : start + _CHUNK_CODES].to(torch.int64)
        pad = -part.numel() % 8
        if pad:
            part = torch.nn.functional.pad(part, (0, pad))
        words = (part.view(-1, 8) << code_shifts).sum(dim=1)  # disjoint bits: sum == or
        chunk = ((words.unsqueeze(1) >> byte_shifts) & 0xFF).to(torch.uint8).reshape(-1)
        first = start * width // 8
        last = min(first + chunk.numel(), n_bytes)
        out[first:last] = chunk[: last - first]
    return out


def unpack_bits(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """The first ``n`` codes (1-D uint8, same device) of a stream written by :func:`pack_bits`."""
    _check_width(width)
    if isinstance(n, bool) or int(n) != n or n < 0:
        raise ValueError(f"the number of codes must be an int >= 0, got {n!r}")
    n = int(n)
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        got = packed.dtype if isinstance(packed, torch.Tensor) else type(packed).__name__
        raise ValueError(f"packed codes must be a uint8 tensor, got {got}")
    flat = packed.reshape(-1)
    n_bytes = packed_nbytes(n, width)
    if flat.numel() < n_bytes:
        raise ValueError(
            f"{n} codes of {width} bits need {n_bytes} bytes, but the packed array has "
            f"{flat.numel()}"
        )
    if width == 8:
        return flat[:n].clone()
    out = torch.empty(n, dtype=torch.uint8, device=flat.device)
    byte_shifts = torch.arange(width, device=flat.device, dtype=torch.int64) * 8
    code_shifts = torch.arange(8, device=flat.device, dtype=torch.int64) * width
    mask = (1 << width) - 1
    for start in range(0, n, _CHUNK_CODES):
        count = min(_CHUNK_CODES, n - start)
        first = start * width // 8
        part = flat[first : first + packed_nbytes(count, width)].to(torch.int64)
        pad = -part.numel() % width
        if pad:
            part = torch.nn.functional.pad(part, (0, pad))
        words = (part.view(-1, width) << byte_shifts).sum(dim=1)
        chunk = ((words.unsqueeze(1) >> code_shifts) & mask).to(torch.uint8).reshape(-1)
        out[start : start + count] = chunk[:count]
    return out
