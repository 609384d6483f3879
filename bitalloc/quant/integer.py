"""Asymmetric integer codes per block: min-max step, an integer zero point, round to nearest.

For a block of weights with minimum ``lo`` and maximum ``hi``, both widened to include 0
(``lo <= 0 <= hi``, as GPTQ and AutoRound do, so the zero point is always in range and an
exact 0 stays exact), the block's scale is the step ``s = (hi - lo) / (2**bits - 1)``. It is
stored like an NF block's absmax (fp16 or double-quantized, :mod:`bitalloc.quant.scales`);
the zero point and the codes are chosen against the *decoded* step, so they fit what a
reader sees:

* zero point ``z = clamp(round(-lo / s), 0, 2**bits - 1)``, a ``bits``-bit unsigned integer;
* code ``q = clamp(round(w / s) + z, 0, 2**bits - 1)``;
* value ``(q - z) * s``.

A block whose decoded step is 0 has ``z = q = 0`` and decodes to zeros. All of it is float32
arithmetic on integer-valued floats, so :func:`int_values` of the stored codes equals the
round trip without packing, bit for bit.

Uniform quantization noise: for weights spread smoothly over many steps, the rounding error
of each weight is close to uniform on ``[-s/2, s/2]``, mean square ``s**2 / 12``.
"""

from __future__ import annotations

import torch

from bitalloc.quant.arith import true_divide


def top_code(bits: int) -> int:
    """The largest code of ``bits`` bits, ``2**bits - 1``."""
    return 2**bits - 1


def block_step_lo(blocks: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(step, lo)`` per block of float32 ``blocks`` (..., block): the min-max step and the block
    minimum, with the range widened to include 0 (zero padding therefore changes nothing)."""
    lo = blocks.amin(dim=-1).clamp_(max=0.0)
    hi = blocks.amax(dim=-1).clamp_(min=0.0)
    return true_divide(hi - lo, top_code(bits)), lo


def zero_points(lo: torch.Tensor, step: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 integer zero points ``clamp(round(-lo / step), 0, top)`` (0 where ``step`` is 0)."""
    positive = step > 0
    z = torch.round(-lo / torch.where(positive, step, 1.0))
    return torch.where(positive, z, 0.0).clamp_(0, top_code(bits))


def int_codes(blocks: torch.Tensor, step: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Float32 integer codes of ``blocks`` (..., block) against per-block ``step`` and ``zero``
    (shaped ``blocks.shape[:-1]``): ``clamp(round(w / step) + zero, 0, top)``, ``zero`` where the step is 0."""
    s = step.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    positive = s > 0
    q = torch.round(blocks / torch.where(positive, s, 1.0)).add_(z)
    return torch.where(positive, q, z).clamp_(0, top_code(bits))


def int_values(codes: torch.Tensor, step: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(codes - zero) * step`` for float32 ``codes`` (..., block) and per-block ``step``, ``zero``."""
    return (codes - zero.unsqueeze(-1)).mul_(step.unsqueeze(-1))


def int_round(blocks: torch.Tensor, step: torch.Tensor, lo: torch.Tensor, bits: int) -> torch.Tensor:
    """The quantized values of ``blocks`` for decoded steps ``step`` and block minima ``lo``
    (what :func:`int_codes` then :func:`int_values` give, without keeping the codes)."""
    zero = zero_points(lo, step, bits)
    return int_values(int_codes(blocks, step, zero, bits), step, zero)
