"""Blockwise quantization of a weight matrix, stored exactly as ``QuantConfig`` counts it.

Each row of ``W`` (rows x cols) is zero-padded to a multiple of ``cfg.block``; blocks are
consecutive weights along a row, ordered row-major. Each block has one scale (stored per
:mod:`bitalloc.quant.scales`). In the ``nf`` family the scale is the block's absmax and each
weight is coded as the nearest NF level of ``w / scale``; in the ``int`` family the scale is
the block's min-max step and each block also stores a ``bits``-bit zero point
(:mod:`bitalloc.quant.integer`). Codes, padded positions included, are packed densely in the
same order; zero points likewise, one per block.

Work is done in float32 on ``W``'s device, a slab of rows at a time, so that no more than
a few float32 copies of a slab exist at once.

:func:`quantize_dequantize` is the fast path for code that only needs the reconstructed
matrix (the decomposition loop): it returns exactly ``quantize(W, cfg).dequantize()``, bit
for bit, without packing codes or scales (packing and unpacking are a third of a
quantize-dequantize round trip on CPU).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

import torch

from bitalloc.configs import QuantConfig
from bitalloc.quant import kernels
from bitalloc.quant.integer import block_step_lo, int_codes, int_round, int_values, zero_points
from bitalloc.quant.nf import nf_decode, nf_encode_index, nf_round
from bitalloc.quant.packing import pack_bits, packed_nbytes, unpack_bits
from bitalloc.quant.scales import (
    decode_block_scales,
    encode_block_scales,
    roundtrip_block_scales,
    scale_array_specs,
)

#: Target elements per slab of rows (16 Mi float32 = 64 MiB per temporary).
_SLAB_ELEMENTS = 1 << 24


def _slabs(rows: int, row_len: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``_SLAB_ELEMENTS`` elements; every start is a multiple of 8 rows,
    so each slab's packed codes start on a byte boundary."""
    step = max(8, (_SLAB_ELEMENTS // max(row_len, 1)) // 8 * 8)
    for start in range(0, rows, step):
        yield start, min(start + step, rows)


def _check_matrix(W: torch.Tensor) -> None:
    if not isinstance(W, torch.Tensor):
        raise ValueError(f"quantize expects a torch.Tensor, got {type(W).__name__}")
    if W.dim() != 2:
        raise ValueError(f"quantize expects a 2-D matrix (rows x cols), got shape {tuple(W.shape)}")
    if W.numel() == 0:
        raise ValueError(f"quantize expects a non-empty matrix, got shape {tuple(W.shape)}")
    if not W.is_floating_point():
        raise ValueError(f"quantize expects a floating-point matrix, got dtype {W.dtype}")
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(
            f"the matrix contains NaN/inf: {bad} of {W.numel()} entries are not finite"
        )


def _blocks(W: torch.Tensor, start: int, stop: int, block: int) -> torch.Tensor:
    """Rows ``start:stop`` of ``W`` as float32 blocks (n_rows, blocks_per_row, block)."""
    x = W[start:stop].to(torch.float32)
    pad = -x.shape[1] % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.view(x.shape[0], -1, block)


def _parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    value = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(value, torch.dtype):
        raise ValueError(f"unknown dtype {dtype!r}")
    return value


@dataclass
class QuantizedTensor:
    """A matrix stored as packed codes, (double-quantized) block scales and, for the ``int``
    family, packed zero points.

    ``codes`` holds the packed NF or integer codes; the scales are ``scales`` (fp16) when
    ``config.scale_bits == 16``, else ``scale_codes`` (packed), ``scale2`` (fp16/fp32,
    one per group of blocks) and ``offset`` (one fp32); ``zeros`` the packed ``bits``-bit
    zero points of an ``int`` config (one per block).
    """

    codes: torch.Tensor
    shape: tuple[int, int]
    dtype: torch.dtype
    config: QuantConfig
    scales: torch.Tensor | None = None
    scale_codes: torch.Tensor | None = None
    scale2: torch.Tensor | None = None
    offset: torch.Tensor | None = None
    zeros: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.shape = (int(self.shape[0]), int(self.shape[1]))
        self.dtype = _parse_dtype(self.dtype)
        for name, (dtype, count) in self.array_specs().items():
            value = getattr(self, name)
            if not isinstance(value, torch.Tensor):
                raise ValueError(f"QuantizedTensor for {self.config.name} needs array {name!r}")
            if value.dtype != dtype or value.numel() != count:
                raise ValueError(
                    f"array {name!r} of a {self.shape} {self.config.name} matrix must be "
                    f"{count} x {dtype}, got {value.numel()} x {value.dtype}"
                )
        stray = [n for n in ("scales", "scale_codes", "scale2", "offset", "zeros")
                 if getattr(self, n) is not None and n not in self.array_specs()]
        if stray:
            raise ValueError(f"arrays {stray} do not belong to a {self.config.name} matrix")

    # ----- layout ------------------------------------------------------------------------
    @property
    def blocks_per_row(self) -> int:
        """Blocks in each (zero-padded) row."""
        return -(-self.shape[1] // self.config.block)

    @property
    def n_blocks(self) -> int:
        """Blocks in the whole matrix."""
        return self.shape[0] * self.blocks_per_row

    def array_specs(self) -> dict[str, tuple[torch.dtype, int]]:
        """Name -> (dtype, element count) of every stored array."""
        cfg = self.config
        n_codes = self.n_blocks * cfg.block
        specs = {"codes": (torch.uint8, packed_nbytes(n_codes, cfg.bits))}
        specs.update(scale_array_specs(self.n_blocks, cfg))
        if cfg.family == "int":
            specs["zeros"] = (torch.uint8, packed_nbytes(self.n_blocks, cfg.bits))
        return specs

    def arrays(self) -> dict[str, torch.Tensor]:
        """Name -> stored tensor (what a safetensors file holds for this matrix)."""
        return {name: getattr(self, name) for name in self.array_specs()}

    @classmethod
    def from_arrays(
        cls,
        arrays: dict[str, torch.Tensor],
        shape: tuple[int, int],
        dtype: torch.dtype | str,
        config: QuantConfig,
    ) -> "QuantizedTensor":
        """Rebuild from :meth:`arrays` (sizes and dtypes are checked against ``config``)."""
        known = {"codes", "scales", "scale_codes", "scale2", "offset", "zeros"}
        unknown = set(arrays) - known
        if unknown:
            raise ValueError(f"unknown arrays {sorted(unknown)}; expected some of {sorted(known)}")
        return cls(shape=tuple(shape), dtype=dtype, config=config, **arrays)

    @property
    def nbytes(self) -> int:
        """Total bytes of all stored arrays."""
        return sum(t.numel() * t.element_size() for t in self.arrays().values())

    @property
    def device(self) -> torch.device:
        return self.codes.device

    def to(self, device: torch.device | str) -> "QuantizedTensor":
        """A copy with every stored array on ``device``."""
        moved = {name: t.to(device) for name, t in self.arrays().items()}
        return dataclasses.replace(self, **moved)

    # ----- decoding ----------------------------------------------------------------------
    def block_scales(self) -> torch.Tensor:
        """The decoded float32 block scales, (rows, blocks_per_row)."""
        scale_arrays = {k: v for k, v in self.arrays().items() if k not in ("codes", "zeros")}
        s = decode_block_scales(scale_arrays, self.n_blocks, self.config)
        return s.view(self.shape[0], self.blocks_per_row)

    def dequantize(self) -> torch.Tensor:
        """The reconstructed matrix, in the original shape, dtype and (current) device."""
        rows, cols = self.shape
        bits, block = self.config.bits, self.config.block
        row_len = self.blocks_per_row * block
        scales = self.block_scales()
        zeros = self.zero_points()
        out = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        for start, stop in _slabs(rows, row_len):
            first = start * row_len * bits // 8
            n_codes = (stop - start) * row_len
            codes = unpack_bits(self.codes[first:], bits, n_codes)
            if zeros is None:
                levels = nf_decode(codes, bits).view(stop - start, self.blocks_per_row, block)
                values = levels * scales[start:stop].unsqueeze(-1)
            else:
                q = codes.to(torch.float32).view(stop - start, self.blocks_per_row, block)
                values = int_values(q, scales[start:stop], zeros[start:stop])
            out[start:stop] = values.view(stop - start, row_len)[:, :cols]
        return out

    def zero_points(self) -> torch.Tensor | None:
        """The float32 integer zero points, (rows, blocks_per_row), of an ``int`` config; else None."""
        if self.config.family != "int":
            return None
        z = unpack_bits(self.zeros, self.config.bits, self.n_blocks).to(torch.float32)
        return z.view(self.shape[0], self.blocks_per_row)


def _absmax(W: torch.Tensor, block: int) -> torch.Tensor:
    rows, cols = W.shape
    blocks_per_row = -(-cols // block)
    absmax = torch.empty(rows, blocks_per_row, dtype=torch.float32, device=W.device)
    for start, stop in _slabs(rows, blocks_per_row * block):
        absmax[start:stop] = _blocks(W, start, stop, block).abs().amax(dim=-1)
    return absmax


def _int_step_lo(W: torch.Tensor, block: int, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min-max steps and (0-widened) minima of every block, each (rows, blocks_per_row)."""
    rows, cols = W.shape
    blocks_per_row = -(-cols // block)
    step = torch.empty(rows, blocks_per_row, dtype=torch.float32, device=W.device)
    lo = torch.empty_like(step)
    for start, stop in _slabs(rows, blocks_per_row * block):
        step[start:stop], lo[start:stop] = block_step_lo(_blocks(W, start, stop, block), bits)
    return step, lo


def _scaled(W: torch.Tensor, start: int, stop: int, block: int, s: torch.Tensor) -> torch.Tensor:
    """Blocks of rows ``start:stop`` divided by their scales ``s`` (zero scale: all zeros)."""
    positive = s > 0
    y = _blocks(W, start, stop, block) / torch.where(positive, s, 1.0)
    if not bool(positive.all()):
        y.masked_fill_(~positive, 0.0)  # a zero scale codes level 0 for its whole block
    return y


def quantize(W: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """Quantize a 2-D floating-point matrix with NF or integer codes and block scales as ``cfg`` says.

    ``cfg.rank`` and ``cfg.lowrank_bits`` are ignored: this stores the matrix it is given.
    Raises ValueError for non-2-D, empty, non-float or non-finite input.
    """
    _check_matrix(W)
    if cfg.family == "int":
        return _quantize_int(W, cfg)
    rows, cols = W.shape
    bits, block = cfg.bits, cfg.block
    blocks_per_row = -(-cols // block)
    row_len = blocks_per_row * block

    absmax = _absmax(W, block)
    scale_arrays = encode_block_scales(absmax.view(-1), cfg)
    del absmax
    scales = decode_block_scales(scale_arrays, rows * blocks_per_row, cfg)
    scales = scales.view(rows, blocks_per_row, 1)

    codes = torch.empty(rows * row_len, dtype=torch.uint8, device=W.device)
    for start, stop in _slabs(rows, row_len):
        y = _scaled(W, start, stop, block, scales[start:stop])
        codes[start * row_len : stop * row_len] = nf_encode_index(y, bits).view(-1)
    packed = pack_bits(codes, bits)
    return QuantizedTensor(
        codes=packed, shape=(rows, cols), dtype=W.dtype, config=cfg, **scale_arrays
    )


def _quantize_int(W: torch.Tensor, cfg: QuantConfig) -> QuantizedTensor:
    """:func:`quantize` for the ``int`` family: steps as block scales, packed zero points."""
    rows, cols = W.shape
    bits, block = cfg.bits, cfg.block
    blocks_per_row = -(-cols // block)
    row_len = blocks_per_row * block
    step, lo = _int_step_lo(W, block, bits)
    scale_arrays = encode_block_scales(step.view(-1), cfg)
    steps = decode_block_scales(scale_arrays, rows * blocks_per_row, cfg).view(rows, blocks_per_row)
    zeros = zero_points(lo, steps, bits)
    codes = torch.empty(rows * row_len, dtype=torch.uint8, device=W.device)
    for start, stop in _slabs(rows, row_len):
        q = int_codes(_blocks(W, start, stop, block), steps[start:stop], zeros[start:stop], bits)
        codes[start * row_len : stop * row_len] = q.to(torch.uint8).view(-1)
    return QuantizedTensor(
        codes=pack_bits(codes, bits), shape=(rows, cols), dtype=W.dtype, config=cfg,
        zeros=pack_bits(zeros.to(torch.uint8).view(-1), bits), **scale_arrays,
    )


def quantize_dequantize(W: torch.Tensor, cfg: QuantConfig, *, check: bool = True) -> torch.Tensor:
    """``quantize(W, cfg).dequantize()``, bit-identical, without packing anything (fast path).

    ``check=False`` skips the input validation (2-D, non-empty, float, finite) for callers
    that have validated ``W`` already; the result for invalid input is then undefined.
    On the CPU, for float32, the rounding runs in a compiled kernel
    (:mod:`bitalloc.quant.kernels`) when numba is present; else in tensor code.
    """
    if check:
        _check_matrix(W)
    return _round_trip(W, cfg, residual=False)


def quantize_residual(W: torch.Tensor, cfg: QuantConfig, *, check: bool = True) -> torch.Tensor:
    """``W - quantize_dequantize(W, cfg)``, bit for bit (one pass fewer on the kernel path)."""
    if check:
        _check_matrix(W)
    return _round_trip(W, cfg, residual=True)


def _round_trip(W: torch.Tensor, cfg: QuantConfig, residual: bool) -> torch.Tensor:
    """The values of ``quantize(W, cfg)`` (or ``W`` minus them), without packing."""
    if cfg.family == "int":
        return _round_trip_int(W, cfg, residual)
    if kernels.applies(W):
        return _round_trip_compiled(W.contiguous(), cfg, residual)
    rows, cols = W.shape
    bits, block = cfg.bits, cfg.block
    blocks_per_row = -(-cols // block)
    row_len = blocks_per_row * block
    slabs = list(_slabs(rows, row_len))
    scales = roundtrip_block_scales(_absmax(W, block), cfg).view(rows, blocks_per_row, 1)
    if not residual and len(slabs) == 1 and row_len == cols and W.dtype == torch.float32:
        # one slab, no padding: the rounded blocks are the result (no copy into ``out``)
        return nf_round(_scaled(W, 0, rows, block, scales), bits).mul_(scales).view(rows, cols)
    out = torch.empty((rows, cols), dtype=W.dtype, device=W.device)
    for start, stop in slabs:
        s = scales[start:stop]
        values = nf_round(_scaled(W, start, stop, block, s), bits).mul_(s)
        out[start:stop] = values.view(stop - start, row_len)[:, :cols]
    return W - out if residual else out


def _round_trip_int(W: torch.Tensor, cfg: QuantConfig, residual: bool) -> torch.Tensor:
    """:func:`_round_trip` for the ``int`` family (tensor code, a slab at a time)."""
    rows, cols = W.shape
    bits, block = cfg.bits, cfg.block
    blocks_per_row = -(-cols // block)
    row_len = blocks_per_row * block
    step, lo = _int_step_lo(W, block, bits)
    steps = roundtrip_block_scales(step, cfg).view(rows, blocks_per_row)
    out = torch.empty((rows, cols), dtype=W.dtype, device=W.device)
    for start, stop in _slabs(rows, row_len):
        values = int_round(_blocks(W, start, stop, block), steps[start:stop], lo[start:stop], bits)
        out[start:stop] = values.view(stop - start, row_len)[:, :cols]
    return W - out if residual else out


def _round_trip_compiled(W: torch.Tensor, cfg: QuantConfig, residual: bool) -> torch.Tensor:
    """:func:`_round_trip` through the CPU kernels (W contiguous float32), a slab at a time."""
    rows, cols = W.shape
    block = cfg.block
    blocks_per_row = -(-cols // block)
    row_len = blocks_per_row * block
    scales = roundtrip_block_scales(kernels.block_absmax(W, block), cfg).view(rows, blocks_per_row, 1)
    slabs = list(_slabs(rows, row_len))
    out = W.new_empty(rows, cols) if len(slabs) > 1 else None
    for start, stop in slabs:
        s = scales[start:stop].expand(stop - start, blocks_per_row, block)
        s = s.reshape(stop - start, row_len)[:, :cols].contiguous()
        values = kernels.round_to_levels(W[start:stop], s, cfg.bits, residual=residual)
        if out is None:
            return values
        out[start:stop] = values
    return out
