"""LoRAQuant's SVD re-parameterization and the exact error of every config, in batches.

``ΔW = s·B·A`` (B: rows x r, A: r x cols) is split as ``B' = U·S^½``, ``A' = S^½·Vᵀ`` from the
SVD of ΔW restricted to rank r, found without forming ΔW: ``B = Q_b R_b``, ``Aᵀ = Q_a R_a``,
then the r x r SVD ``s·R_b R_aᵀ = U_c S V_cᵀ`` gives ``U = Q_b U_c``, ``V = Q_a V_c``. Signs are
fixed so that each column of U has its largest-magnitude entry positive (deterministic).

Groups lie inside one rank-1 component, so a component's quantized value depends only on
(bits, group), not on h: each (bits, group) is quantized once for all r components and every
h reuses it. The error ``‖B'A' − B̂Â‖²_F`` of any choice is ``wᵀ (G_B ⊙ G_A) w`` with the Gram
matrices of the stacked factors ``[B', B̂_high, B̂_low]`` and ``[A'; Â_high; Â_low]`` and a
±1/0 selection ``w``: O((rows + cols)·r²) per module, never a rows x cols product.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from bitalloc.adapters.config import AdapterQuantConfig
from bitalloc.adapters.fit import fit_affine, fit_groups
from bitalloc.quant.affine import quantize_affine, quantize_binary
from bitalloc.quant.arith import true_divide

_FP16_MAX = torch.finfo(torch.float16).max


@dataclass(frozen=True)
class SplitFactors:
    """``B'`` (N, rows, r) and ``A'`` (N, r, cols) in float64 with ``B'A' = ΔW``; singular values (N, r)."""

    b: torch.Tensor
    a: torch.Tensor
    s: torch.Tensor

    def __len__(self) -> int:
        return int(self.b.shape[0])


def svd_split(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: torch.Tensor | float) -> SplitFactors:
    """Split a batch of LoRA modules (A: (N, r, cols) or (r, cols), B: (N, rows, r) or (rows, r))."""
    if lora_a.dim() == 2:
        lora_a, lora_b = lora_a.unsqueeze(0), lora_b.unsqueeze(0)
    n, rank, cols = lora_a.shape
    scale = torch.as_tensor(scale, dtype=torch.float64).reshape(-1)
    if scale.numel() == 1:
        scale = scale.expand(n)
    qb, rb = torch.linalg.qr(lora_b.double())  # (N, rows, k1), (N, k1, r)
    qa, ra = torch.linalg.qr(lora_a.double().transpose(1, 2))  # (N, cols, k2), (N, k2, r)
    core = scale.view(-1, 1, 1) * (rb @ ra.transpose(1, 2))  # (N, k1, k2)
    uc, s, vch = torch.linalg.svd(core, full_matrices=False)
    u = qb @ uc  # (N, rows, k)
    v = qa @ vch.transpose(1, 2)  # (N, cols, k)
    pivot = u.abs().argmax(dim=1, keepdim=True)
    sign = torch.sign(torch.gather(u, 1, pivot))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    u, v = u * sign, v * sign
    k = s.shape[1]
    if k < rank:  # rank above a side of the matrix: the extra components are zero
        u = torch.nn.functional.pad(u, (0, rank - k))
        v = torch.nn.functional.pad(v, (0, rank - k))
        s = torch.nn.functional.pad(s, (0, rank - k))
    root = s.sqrt()
    return SplitFactors(b=u * root.unsqueeze(1), a=root.unsqueeze(2) * v.transpose(1, 2), s=s)


# ----- fake quantization (the values quantize_affine / quantize_binary decode to) ---------
class _Lines:
    """Lines (last dim) cut into groups once, for several quantizers of one group size.

    Affine groups are padded by repeating each line's last value, which leaves every group's
    min and max unchanged (so no mask is needed); binary groups are zero-padded and divide by
    the count of real entries, as :func:`bitalloc.quant.quantize_binary` does.
    """

    def __init__(self, lines: torch.Tensor, group: int) -> None:
        x = lines.to(torch.float32)
        self.length = x.shape[-1]
        self.pad = -self.length % group
        self.group = group
        lead = x.shape[:-1]
        flat = x.reshape(-1, self.length)
        if self.pad:
            flat = torch.nn.functional.pad(flat.unsqueeze(1), (0, self.pad), mode="replicate").squeeze(1)
        self.g = flat.reshape(*lead, -1, group)
        self._range: tuple[torch.Tensor, torch.Tensor] | None = None
        #: Real (not padding) positions of a line's groups, (groups per line, group).
        self.valid = (torch.arange(self.length + self.pad) < self.length).view(-1, group)

    def _out(self, values: torch.Tensor) -> torch.Tensor:
        return values.reshape(*values.shape[:-2], -1)[..., : self.length]

    def affine(self, bits: int, fit: bool = False) -> torch.Tensor:
        """Dequantized affine RTN, bit for bit what ``quantize_affine(...).dequantize()`` gives
        (with ``fit``: what ``fit_affine(...).dequantize()`` gives)."""
        if fit:
            q, s, z = fit_groups(self.g, self.valid if self.pad else None, bits)
            return self._out(q.mul_(s).add_(z))
        if self._range is None:
            lo, hi = torch.aminmax(self.g, dim=-1, keepdim=True)
            self._range = (lo, hi)
        lo, hi = self._range
        top = 2**bits - 1
        s = true_divide(hi - lo, top).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
        z = lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
        positive = s > 0
        q = torch.round((self.g - z) / torch.where(positive, s, torch.ones_like(s))).clamp_(0, top)
        if not bool(positive.all()):
            q = q * positive  # a constant group stores code 0 and decodes to its zero point
        return self._out(q.mul_(s).add_(z))

    def binary(self) -> torch.Tensor:
        """Dequantized sign·mean|x|, bit for bit what ``quantize_binary(...).dequantize()`` gives."""
        g = self.g
        if self.pad:
            valid = torch.arange(self.g.shape[-2] * self.group) < self.length
            g = g * valid.view(-1, self.group).to(g.dtype)
        count = torch.full(g.shape[-2:-1], float(self.group))
        if self.pad:
            count[-1] = self.group - self.pad
        mean = (g.abs().sum(dim=-1) / count).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
        out = (2 * (g >= 0).to(torch.float32) - 1) * mean.unsqueeze(-1)
        return self._out(out)


def fake_affine(lines: torch.Tensor, bits: int, group: int, fit: bool = False) -> torch.Tensor:
    """``quantize_affine(...).dequantize()`` (``fit``: ``fit_affine``) of every line (last dim)
    at once, float32, bit for bit."""
    return _Lines(lines, group).affine(bits, fit)


def fake_binary(lines: torch.Tensor, group: int) -> torch.Tensor:
    """``quantize_binary(...).dequantize()`` of every line (last dim) at once, float32, bit for bit."""
    return _Lines(lines, group).binary()


def dequantized_factors(f: SplitFactors, config: AdapterQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B̂, Â)`` of every module of the batch under one config, float32 (what ``apply`` writes)."""
    h = config.high
    rank = f.b.shape[2]
    config.check_rank(rank)
    b_lines, a_lines = _Lines(f.b.transpose(1, 2), config.group), _Lines(f.a, config.group)
    b = torch.zeros(f.b.shape[0], rank, f.b.shape[1])
    a = torch.zeros(f.a.shape, dtype=torch.float32)
    if h:
        b[:, :h] = b_lines.affine(config.bits, config.fit)[:, :h]
        a[:, :h] = a_lines.affine(config.bits, config.fit)[:, :h]
    if config.low_bits and h < rank:
        b[:, h:], a[:, h:] = b_lines.binary()[:, h:], a_lines.binary()[:, h:]
    return b.transpose(1, 2), a


def _gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(N, r, r') inner products of the lines of x and y, float64."""
    return x.double() @ y.double().transpose(1, 2)


def _prefix(m: torch.Tensor) -> torch.Tensor:
    """2-D prefix sums with a zero border: ``P[:, i, j] = Σ_{k<i, l<j} m[:, k, l]``."""
    p = torch.zeros(m.shape[0], m.shape[1] + 1, m.shape[2] + 1, dtype=m.dtype)
    p[:, 1:, 1:] = m.cumsum(dim=1).cumsum(dim=2)
    return p


def config_errors(
    f: SplitFactors, configs: Sequence[AdapterQuantConfig], weight: torch.Tensor | None = None
) -> np.ndarray:
    """Exact ``‖B'A' − B̂Â‖²_F`` for every module of the batch (rows) and config (columns);
    with ``weight`` (cols x cols, symmetric, e.g. the input second moments ``H``) the
    activation-weighted ``tr(ΔE H ΔEᵀ)``, ``ΔE = B'A' − B̂Â``.

    With per-component weights ``u = 1`` (B'), ``v = [k < h]`` (high) and ``z = low·[k >= h]``
    (low), the error is ``uᵀM_uu u + vᵀM_vv v + zᵀM_zz z − 2uᵀM_uv v − 2uᵀM_uz z + 2vᵀM_vz z``
    with ``M_xy = (X_Bᵀ Y_B) ⊙ (X_A Y_Aᵀ)``: r x r blocks computed once per (bits, group), and
    every h read off their 2-D prefix sums, since v and z select leading and trailing components.
    """
    n, _, rank = f.b.shape
    out = np.full((n, len(configs)), np.nan)
    by_group: dict[int, list[int]] = {}
    for j, cfg in enumerate(configs):
        if cfg.high <= rank:
            by_group.setdefault(cfg.group, []).append(j)
    bt, at = f.b.transpose(1, 2), f.a  # components as lines: (N, r, rows), (N, r, cols)
    if weight is None:
        gram_a = _gram
    else:
        w = weight.to(torch.float64)
        gram_a = lambda x, y: _gram(x.double() @ w, y)  # noqa: E731  (x H yᵀ on the A side)
    m_uu = (_gram(bt, bt) * gram_a(at, at)).sum(dim=(1, 2))  # = ‖ΔW‖² (weighted: tr(ΔW H ΔWᵀ))
    for group, cols in by_group.items():
        b_lines, a_lines = _Lines(bt, group), _Lines(at, group)
        lb, la = b_lines.binary().double(), a_lines.binary().double()
        base_b, base_a = torch.cat([bt, lb], dim=1), torch.cat([at, la], dim=1)  # [B'; low] lines
        low_b, low_a = _gram(lb, base_b), gram_a(la, base_a)
        p_zz = _prefix(low_b[:, :, rank:] * low_a[:, :, rank:])
        p_uz = _prefix((low_b[:, :, :rank] * low_a[:, :, :rank]).transpose(1, 2))
        for bits, fit in sorted({(configs[j].bits, configs[j].fit) for j in cols}):
            js = [j for j in cols if (configs[j].bits, configs[j].fit) == (bits, fit)]
            hb, ha = b_lines.affine(bits, fit).double(), a_lines.affine(bits, fit).double()
            cross_b, cross_a = _gram(hb, base_b), gram_a(ha, base_a)  # high · [B'; low]
            p_vv = _prefix(_gram(hb, hb) * gram_a(ha, ha))
            p_uv = _prefix((cross_b[:, :, :rank] * cross_a[:, :, :rank]).transpose(1, 2))
            p_vz = _prefix(cross_b[:, :, rank:] * cross_a[:, :, rank:])
            h = torch.tensor([configs[j].high for j in js])
            low = torch.tensor([float(configs[j].low_bits) for j in js], dtype=torch.float64)
            r = torch.full_like(h, rank)
            vv = p_vv[:, h, h]
            zz = p_zz[:, r, r] - p_zz[:, h, r] - p_zz[:, r, h] + p_zz[:, h, h]
            uv = p_uv[:, r, h]
            uz = p_uz[:, r, r] - p_uz[:, r, h]
            vz = p_vz[:, h, r] - p_vz[:, h, h]
            err = m_uu.unsqueeze(1) + vv + low * low * zz - 2 * uv - 2 * low * uz + 2 * low * vz
            out[:, js] = err.clamp_min(0).numpy()
    return out


def quantize_module(b: torch.Tensor, a: torch.Tensor, config: AdapterQuantConfig) -> dict[str, object]:
    """Pack one module's ``B'`` (rows x r) and ``A'`` (r x cols) as ``config`` says.

    Returns ``{"B.high": AffineQuantized, "A.high": ..., "B.low": BinaryQuantized, "A.low": ...}``
    (parts with no components are absent).
    """
    rank = b.shape[1]
    config.check_rank(rank)
    h = config.high
    parts: dict[str, object] = {}
    if h:
        affine = fit_affine if config.fit else quantize_affine
        parts["B.high"] = affine(b[:, :h].float().contiguous(), config.bits, config.group, dim=0)
        parts["A.high"] = affine(a[:h].float().contiguous(), config.bits, config.group, dim=1)
    if config.low_bits and h < rank:
        parts["B.low"] = quantize_binary(b[:, h:].float().contiguous(), config.group, dim=0)
        parts["A.low"] = quantize_binary(a[h:].float().contiguous(), config.group, dim=1)
    return parts
