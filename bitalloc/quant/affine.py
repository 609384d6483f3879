"""Group-wise round-to-nearest (asymmetric) and binary quantization, as LoRAQuant uses.

Groups are ``group`` consecutive elements along a *line*: with ``dim=1`` the lines are the
rows (groups run along rows, e.g. for ``A'``), with ``dim=0`` the lines are the columns
(groups run down columns, e.g. for ``B'``). Each line is zero-padded to a multiple of
``group``; padding takes no part in a group's statistics but its codes are stored (and
counted). Codes are packed line by line, in line order.

Affine (``bits`` in 1..8): per group an fp16 ``scale = (max - min) / (2**bits - 1)`` and an
fp16 zero point stored as a *value*, the group minimum, so that ``x ≈ code * scale + zero``
(a float zero point keeps groups that do not straddle 0 exact at their ends, which an
integer zero point cannot). Storage: the packed codes plus 2 x 16 bits per group.

Binary: one sign bit per element (1 for ``x >= 0``, so zeros decode to ``+mean``) and one
fp16 ``mean |x|`` per group: ``x ≈ ±mean``. Storage: the packed bits plus 16 bits per group.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch

from bitalloc.quant.arith import true_divide
from bitalloc.quant.packing import pack_bits, packed_nbytes, unpack_bits

logger = logging.getLogger(__name__)

_FP16_MAX = torch.finfo(torch.float16).max


# ----- layout and accounting -------------------------------------------------------------
def _check_layout(rows: int, cols: int, group: int, dim: int) -> None:
    if int(rows) != rows or int(cols) != cols or rows < 1 or cols < 1:
        raise ValueError(f"a matrix shape must be two positive ints, got ({rows}, {cols})")
    if isinstance(group, bool) or not isinstance(group, int) or group < 1:
        raise ValueError(f"group must be an int >= 1, got {group!r}")
    if dim not in (0, 1):
        raise ValueError(f"dim must be 0 (groups down columns) or 1 (along rows), got {dim!r}")


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in 1..8, got {bits!r}")


def _lines(rows: int, cols: int, dim: int) -> tuple[int, int]:
    """(number of lines, line length) for groups along ``dim``."""
    return (rows, cols) if dim == 1 else (cols, rows)


def _group_counts(rows: int, cols: int, group: int, dim: int) -> tuple[int, int]:
    """(padded element count, group count)."""
    n_lines, line_len = _lines(rows, cols, dim)
    groups_per_line = -(-line_len // group)
    return n_lines * groups_per_line * group, n_lines * groups_per_line


def affine_storage_bits(rows: int, cols: int, bits: int, group: int, dim: int = 1) -> int:
    """Bits :func:`quantize_affine` stores: codes (padding included) + fp16 scale and zero per group."""
    _check_bits(bits)
    _check_layout(rows, cols, group, dim)
    n_padded, n_groups = _group_counts(rows, cols, group, dim)
    return n_padded * bits + n_groups * 2 * 16


def binary_storage_bits(rows: int, cols: int, group: int, dim: int = 1) -> int:
    """Bits :func:`quantize_binary` stores: one sign bit per (padded) element + fp16 per group."""
    _check_layout(rows, cols, group, dim)
    n_padded, n_groups = _group_counts(rows, cols, group, dim)
    return n_padded + n_groups * 16


def group_lines(x: torch.Tensor, group: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The groups of a 2-D ``x`` as the affine and binary quantizers lay them out.

    Groups run along each row (``dim=1``) or down each column (``dim=0``). Returns float32
    groups (n_lines, groups_per_line, group), zero-padded, and the validity mask
    (groups_per_line, group) of the non-padding positions."""
    lines = x.to(torch.float32)
    if dim == 0:
        lines = lines.t()
    line_len = lines.shape[1]
    pad = -line_len % group
    if pad:
        lines = torch.nn.functional.pad(lines, (0, pad))
    valid = torch.arange(line_len + pad, device=x.device) < line_len
    return lines.reshape(lines.shape[0], -1, group), valid.view(-1, group)


def _ungrouped(values: torch.Tensor, shape: tuple[int, int], dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`group_lines`: drop padding, restore orientation, cast."""
    rows, cols = shape
    n_lines, line_len = _lines(rows, cols, dim)
    lines = values.reshape(n_lines, -1)[:, :line_len]
    if dim == 0:
        lines = lines.t()
    return lines.to(dtype).contiguous()


def _check_input(x: torch.Tensor, group: int, dim: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"expected a 2-D tensor, got {got}")
    if not x.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got dtype {x.dtype}")
    _check_layout(x.shape[0], x.shape[1], group, dim)
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"the matrix contains NaN/inf: {bad} of {x.numel()} entries are not finite")


def _to_fp16(values: torch.Tensor, what: str) -> torch.Tensor:
    if bool((values.abs() > _FP16_MAX).any()):
        logger.warning("%s exceed the fp16 range; saturating", what)
        values = values.clamp(-_FP16_MAX, _FP16_MAX)
    return values.to(torch.float16)


def _check_array(name: str, value: torch.Tensor, dtype: torch.dtype, count: int) -> None:
    if not isinstance(value, torch.Tensor) or value.dtype != dtype or value.numel() != count:
        got = f"{value.numel()} x {value.dtype}" if isinstance(value, torch.Tensor) else repr(value)
        raise ValueError(f"array {name!r} must be {count} x {dtype}, got {got}")


# ----- affine ----------------------------------------------------------------------------
@dataclass
class AffineQuantized:
    """Packed ``bits``-bit codes with per-group fp16 ``scales`` and ``zeros`` (x ≈ q·scale + zero)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    bits: int
    group: int
    dim: int

    STORED_ARRAYS = 3

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        _check_bits(self.bits)
        _check_layout(*self.shape, self.group, self.dim)
        n_padded, n_groups = _group_counts(*self.shape, self.group, self.dim)
        _check_array("codes", self.codes, torch.uint8, packed_nbytes(n_padded, self.bits))
        _check_array("scales", self.scales, torch.float16, n_groups)
        _check_array("zeros", self.zeros, torch.float16, n_groups)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Name -> stored tensor."""
        return {"codes": self.codes, "scales": self.scales, "zeros": self.zeros}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], shape: tuple[int, int],
                    dtype: torch.dtype, bits: int, group: int, dim: int) -> "AffineQuantized":
        """Rebuild from :meth:`arrays`."""
        return cls(shape=tuple(shape), dtype=dtype, bits=bits, group=group, dim=dim, **arrays)

    @property
    def nbytes(self) -> int:
        """Total bytes of all stored arrays."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    def storage_bits(self) -> int:
        """:func:`affine_storage_bits` for this tensor."""
        return affine_storage_bits(*self.shape, self.bits, self.group, self.dim)

    def to(self, device: torch.device | str) -> "AffineQuantized":
        """A copy with every stored array on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.arrays().items()})

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, in the original shape and dtype."""
        n_padded, n_groups = _group_counts(*self.shape, self.group, self.dim)
        q = unpack_bits(self.codes, self.bits, n_padded).to(torch.float32).view(n_groups, self.group)
        values = q * self.scales.to(torch.float32).view(-1, 1) + self.zeros.to(torch.float32).view(-1, 1)
        return _ungrouped(values, self.shape, self.dim, self.dtype)


def quantize_affine(x: torch.Tensor, bits: int, group: int, dim: int = 1) -> AffineQuantized:
    """Asymmetric round-to-nearest, ``bits`` bits, per group of ``group`` along ``dim``."""
    _check_bits(bits)
    _check_input(x, group, dim)
    top_code = 2**bits - 1
    g, valid = group_lines(x, group, dim)
    inf = torch.tensor(float("inf"), device=x.device)
    lo = torch.where(valid, g, inf).amin(dim=-1)
    hi = torch.where(valid, g, -inf).amax(dim=-1)
    scales = _to_fp16(true_divide(hi - lo, top_code), "group scales")
    zeros = _to_fp16(lo, "group zero points")
    s = scales.to(torch.float32).unsqueeze(-1)
    z = zeros.to(torch.float32).unsqueeze(-1)
    q = torch.round((g - z) / torch.where(s > 0, s, torch.ones_like(s)))
    q = torch.where((s > 0) & valid, q, torch.zeros_like(q)).clamp_(0, top_code)
    return AffineQuantized(
        codes=pack_bits(q.to(torch.uint8), bits),
        scales=scales.reshape(-1),
        zeros=zeros.reshape(-1),
        shape=tuple(x.shape),
        dtype=x.dtype,
        bits=bits,
        group=group,
        dim=dim,
    )


# ----- binary ----------------------------------------------------------------------------
@dataclass
class BinaryQuantized:
    """Packed sign bits with one fp16 ``mean |x|`` per group (x ≈ ±scale)."""

    codes: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    group: int
    dim: int

    STORED_ARRAYS = 2

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        _check_layout(*self.shape, self.group, self.dim)
        n_padded, n_groups = _group_counts(*self.shape, self.group, self.dim)
        _check_array("codes", self.codes, torch.uint8, packed_nbytes(n_padded, 1))
        _check_array("scales", self.scales, torch.float16, n_groups)

    def arrays(self) -> dict[str, torch.Tensor]:
        """Name -> stored tensor."""
        return {"codes": self.codes, "scales": self.scales}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], shape: tuple[int, int],
                    dtype: torch.dtype, group: int, dim: int) -> "BinaryQuantized":
        """Rebuild from :meth:`arrays`."""
        return cls(shape=tuple(shape), dtype=dtype, group=group, dim=dim, **arrays)

    @property
    def nbytes(self) -> int:
        """Total bytes of all stored arrays."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    def storage_bits(self) -> int:
        """:func:`binary_storage_bits` for this tensor."""
        return binary_storage_bits(*self.shape, self.group, self.dim)

    def to(self, device: torch.device | str) -> "BinaryQuantized":
        """A copy with every stored array on ``device``."""
        return dataclasses.replace(self, **{k: v.to(device) for k, v in self.arrays().items()})

    def dequantize(self) -> torch.Tensor:
        """The reconstructed tensor, in the original shape and dtype."""
        n_padded, n_groups = _group_counts(*self.shape, self.group, self.dim)
        bits = unpack_bits(self.codes, 1, n_padded).to(torch.float32).view(n_groups, self.group)
        values = (2 * bits - 1) * self.scales.to(torch.float32).view(-1, 1)
        return _ungrouped(values, self.shape, self.dim, self.dtype)


def quantize_binary(x: torch.Tensor, group: int, dim: int = 1) -> BinaryQuantized:
    """1-bit sign times the group's fp16 ``mean |x|``, per group of ``group`` along ``dim``."""
    _check_input(x, group, dim)
    g, valid = group_lines(x, group, dim)
    count = valid.sum(dim=-1).to(torch.float32)  # padding is zero, so it adds nothing below
    scales = _to_fp16(g.abs().sum(dim=-1) / count, "group means")
    signs = (g >= 0).to(torch.uint8)
    return BinaryQuantized(
        codes=pack_bits(signs, 1),
        scales=scales.reshape(-1),
        shape=tuple(x.shape),
        dtype=x.dtype,
        group=group,
        dim=dim,
    )
