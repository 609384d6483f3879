"""A least-squares fit of each affine group's scale and zero point (configs named ``...-fit``).

Min-max round-to-nearest (:func:`bitalloc.quant.quantize_affine`) spends its levels on the
group's extremes. Given the codes ``q``, the scale ``s`` and zero ``z`` minimizing
``Σ (x - (q·s + z))²`` over the group are a closed-form linear regression of ``x`` on ``q``;
given ``(s, z)``, round-to-nearest gives the best codes. :func:`fit_groups` alternates the two
steps from the min-max start, each step rounding ``s`` and ``z`` to fp16 (what is stored),
and keeps, per group, the fit only where its error is below min-max's, so a fitted group is
never worse than min-max (the best of the rounds is kept). Storage is unchanged: the same codes, one fp16 scale and one fp16
zero per group, decoded by the same ``x ≈ q·s + z``.

The 1-bit low part needs no fit: for sign codes, ``mean |x|`` already minimizes
``Σ (x - α·sign x)²`` over ``α`` (its derivative vanishes at ``α = Σ|x| / n``).
"""

from __future__ import annotations

import torch

from bitalloc.quant.affine import AffineQuantized, group_lines
from bitalloc.quant.arith import true_divide
from bitalloc.quant.packing import pack_bits

#: Alternations of the least-squares (scale, zero) step and re-rounding. Each one can only
#: lower a group's error (up to fp16 rounding; the best round is kept). Measured on synthetic
#: rank-16 adapters (factor error relative to min-max, 2 / 3 / 4 bits): 1 round 0.60 / 0.84 /
#: 0.89, 4 rounds 0.44 / 0.72 / 0.83, 8 rounds 0.42 / 0.69 / 0.82, 16 rounds 0.42 / 0.68 / 0.81.
FIT_ROUNDS = 8

_FP16_MAX = torch.finfo(torch.float16).max


def _fp16(values: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (saturating) and back to float32: the value that is stored."""
    return values.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)


def _codes(g: torch.Tensor, s: torch.Tensor, z: torch.Tensor, top: int) -> torch.Tensor:
    """Round-to-nearest codes for stored ``(s, z)``; a group with ``s <= 0`` stores code 0."""
    positive = s > 0
    q = torch.round((g - z) / torch.where(positive, s, torch.ones_like(s))).clamp_(0, top)
    return q * positive


def fit_groups(
    g: torch.Tensor, valid: torch.Tensor | None, bits: int, rounds: int = FIT_ROUNDS
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Codes, scales and zeros (float32 holding fp16 values) of every group of ``g``.

    ``g``: float32 (..., group); ``valid``: bool mask broadcastable to ``g`` (None: all valid),
    padding entries take no part in the fit and get code 0. Returns ``q`` (..., group) and
    ``s``, ``z`` (..., 1). Each group's error (``Σ (x - q·s - z)²``, from the group's sums in
    float64) is at most that of min-max RTN.
    """
    top = 2**bits - 1
    inf = torch.tensor(float("inf"))
    if valid is None:
        lo, hi = torch.aminmax(g, dim=-1, keepdim=True)
        w = None
    else:
        lo = torch.where(valid, g, inf).amin(dim=-1, keepdim=True)
        hi = torch.where(valid, g, -inf).amax(dim=-1, keepdim=True)
        w = valid.expand_as(g).to(torch.float64)
    x = g.double() if w is None else g.double() * w
    n = torch.full_like(x[..., :1], g.shape[-1]) if w is None else w.sum(dim=-1, keepdim=True)
    sx, sxx = x.sum(dim=-1, keepdim=True), (x * x).sum(dim=-1, keepdim=True)

    def sums(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        qd = q.double() if w is None else q.double() * w
        return qd.sum(dim=-1, keepdim=True), (qd * qd).sum(dim=-1, keepdim=True), (qd * x).sum(dim=-1, keepdim=True)

    def error(s: torch.Tensor, z: torch.Tensor, sq: torch.Tensor, sqq: torch.Tensor, sqx: torch.Tensor) -> torch.Tensor:
        s, z = s.double(), z.double()
        return sxx - 2 * s * sqx - 2 * z * sx + s * s * sqq + 2 * s * z * sq + n * z * z

    s = _fp16(true_divide(hi - lo, top))
    z = _fp16(lo)
    q = _codes(g, s, z, top)
    stats = sums(q)
    best_err = error(s, z, *stats)
    best_q, best_s, best_z = q, s, z
    for _ in range(rounds):
        sq, sqq, sqx = stats
        var = n * sqq - sq * sq
        slope = (n * sqx - sq * sx) / torch.where(var > 0, var, torch.ones_like(var))
        ok = (var > 0) & (slope > 0)
        new_s = _fp16(torch.where(ok, slope, s.double()).float())
        new_z = _fp16(((sx - new_s.double() * sq) / n).float())
        s, z = torch.where(ok, new_s, s), torch.where(ok, new_z, z)
        q_next = _codes(g, s, z, top)
        settled = torch.equal(q_next, q)
        q = q_next
        stats = sums(q)
        err = error(s, z, *stats)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_q = torch.where(better, q, best_q)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
        if settled and not bool(better.any()):
            break  # codes and (s, z) no longer move
    if valid is not None:
        best_q = best_q * valid
    return best_q, best_s, best_z


def fit_affine(x: torch.Tensor, bits: int, group: int, dim: int = 1) -> AffineQuantized:
    """:func:`bitalloc.quant.quantize_affine` with every group's scale and zero fitted by :func:`fit_groups`.

    Same layout, arrays and storage; :meth:`AffineQuantized.dequantize` decodes it.
    """
    g, valid = group_lines(x, group, dim)
    q, s, z = fit_groups(g, valid, bits)
    return AffineQuantized(
        codes=pack_bits(q.to(torch.uint8).reshape(-1), bits),
        scales=s.reshape(-1).to(torch.float16),
        zeros=z.reshape(-1).to(torch.float16),
        shape=tuple(x.shape),
        dtype=x.dtype,
        bits=bits,
        group=group,
        dim=dim,
    )
