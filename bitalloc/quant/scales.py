"""Storing block scales: plain fp16, or double-quantized codes with second-level scales.

With ``cfg.scale_bits == 16`` the scales are one fp16 array ``scales``. Otherwise
(double quantization) four arrays are stored:

* ``offset``: one fp32, the smallest block scale;
* ``scale_codes``: ``scale_bits``-bit unsigned codes of ``s - offset``, packed densely;
* ``scale2``: one second-level scale per group of ``scale_block`` consecutive blocks
  (the group's largest ``s - offset``), in ``cfg.scale_dtype``.

A block's decoded scale is ``code / (2**scale_bits - 1) * scale2[group] + offset``.
:func:`decode_block_scales` is the one definition of that, used when quantizing too, so
the codes are chosen against exactly the scales a reader will see.
:func:`roundtrip_block_scales` gives the same decoded scales without packing (the fast path
of :func:`bitalloc.quant.quantize_dequantize`).
"""

from __future__ import annotations

import logging

import torch

from bitalloc.configs import QuantConfig
from bitalloc.quant.arith import true_divide
from bitalloc.quant.packing import pack_bits, packed_nbytes, unpack_bits

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {"fp16": torch.float16, "fp32": torch.float32}


def scale_array_specs(n_blocks: int, cfg: QuantConfig) -> dict[str, tuple[torch.dtype, int]]:
    """Name -> (dtype, element count) of each stored scale array for ``n_blocks`` blocks."""
    if cfg.scale_bits == 16:
        return {"scales": (torch.float16, n_blocks)}
    n_groups = -(-n_blocks // cfg.scale_block)
    return {
        "scale_codes": (torch.uint8, packed_nbytes(n_blocks, cfg.scale_bits)),
        "scale2": (_TORCH_DTYPES[cfg.scale_dtype], n_groups),
        "offset": (torch.float32, 1),
    }


def _to_storage_dtype(values: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Round float32 ``values`` to ``dtype``, saturating at its largest finite value."""
    top = torch.finfo(dtype).max
    if dtype != torch.float32 and bool((values > top).any()):
        logger.warning("%s exceed the %s range (max %g); saturating", what, dtype, top)
        values = values.clamp(max=top)
    return values.to(dtype)


def _double_quantize(s: torch.Tensor, cfg: QuantConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(codes, scale2, offset)`` of block scales ``s`` (1-D float32) for ``scale_bits < 16``.

    ``codes`` are float32 holding the integer codes, shaped (groups, scale_block) with the
    padding of the last group included (callers trim to ``s.numel()``).
    """
    n_blocks = s.numel()
    top_code = 2**cfg.scale_bits - 1
    offset = s.min().reshape(1)
    residual = s - offset  # >= 0 exactly: offset is one of the values
    n_groups = -(-n_blocks // cfg.scale_block)
    pad = n_groups * cfg.scale_block - n_blocks
    grouped = torch.nn.functional.pad(residual, (0, pad)).view(n_groups, cfg.scale_block)
    scale2 = _to_storage_dtype(
        grouped.amax(dim=1), _TORCH_DTYPES[cfg.scale_dtype], "second-level scales"
    )
    g = scale2.to(torch.float32).unsqueeze(1)
    ratio = grouped / torch.where(g > 0, g, torch.ones_like(g))
    codes = torch.where(g > 0, torch.round(ratio * top_code), torch.zeros_like(ratio))
    return codes.clamp_(0, top_code), scale2, offset


def encode_block_scales(absmax: torch.Tensor, cfg: QuantConfig) -> dict[str, torch.Tensor]:
    """The stored arrays for block scales ``absmax`` (1-D, >= 0, finite), as ``cfg`` says."""
    s = absmax.reshape(-1).to(torch.float32)
    if cfg.scale_bits == 16:
        return {"scales": _to_storage_dtype(s, torch.float16, "block scales")}
    codes, scale2, offset = _double_quantize(s, cfg)
    codes = codes.to(torch.uint8).reshape(-1)[: s.numel()]
    return {
        "scale_codes": pack_bits(codes, cfg.scale_bits),
        "scale2": scale2,
        "offset": offset,
    }


def roundtrip_block_scales(absmax: torch.Tensor, cfg: QuantConfig) -> torch.Tensor:
    """``decode_block_scales(encode_block_scales(absmax, cfg), ...)`` without packing anything.

    The same float32 operations in the same order, so the result is bit-identical (tested).
    """
    s = absmax.reshape(-1).to(torch.float32)
    if cfg.scale_bits == 16:
        return _to_storage_dtype(s, torch.float16, "block scales").to(torch.float32)
    top_code = 2**cfg.scale_bits - 1
    codes, scale2, offset = _double_quantize(s, cfg)
    g = scale2.to(torch.float32).unsqueeze(1)
    return (true_divide(codes, top_code) * g + offset).reshape(-1)[: s.numel()]


def decode_block_scales(
    arrays: dict[str, torch.Tensor], n_blocks: int, cfg: QuantConfig
) -> torch.Tensor:
    """The float32 block scales (1-D, ``n_blocks``) that the stored ``arrays`` describe."""
    if cfg.scale_bits == 16:
        return arrays["scales"].reshape(-1).to(torch.float32)
    top_code = 2**cfg.scale_bits - 1
    codes = unpack_bits(arrays["scale_codes"], cfg.scale_bits, n_blocks).to(torch.float32)
    g = arrays["scale2"].reshape(-1).to(torch.float32)
    g = g.repeat_interleave(cfg.scale_block)[:n_blocks]
    offset = arrays["offset"].reshape(-1).to(torch.float32)
    return true_divide(codes, top_code) * g + offset
