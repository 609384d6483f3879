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
    rows = lora_b.shape[1]
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
def _groups(lines: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    length = lines.shape[-1]
    pad = -length % group
    x = lines.to(torch.float32)
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    valid = (torch.arange(length + pad, device=x.device) < length).view(-1, group)
    return x.reshape(*x.shape[:-1], -1, group), valid, length


def fake_affine(lines: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """``quantize_affine(...).dequantize()`` of every line (last dim) at once, float32, bit for bit."""
    g, valid, length = _groups(lines, group)
    top = 2**bits - 1
    inf = torch.tensor(float("inf"))
    lo = torch.where(valid, g, inf).amin(dim=-1, keepdim=True)
    hi = torch.where(valid, g, -inf).amax(dim=-1, keepdim=True)
    s = true_divide(hi - lo, top).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
    z = lo.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
    q = torch.round((g - z) / torch.where(s > 0, s, torch.ones_like(s)))
    q = torch.where((s > 0) & valid, q, torch.zeros_like(q)).clamp_(0, top)
    out = q * s + z
    return out.reshape(*out.shape[:-2], -1)[..., :length]


def fake_binary(lines: torch.Tensor, group: int) -> torch.Tensor:
    """``quantize_binary(...).dequantize()`` of every line (last dim) at once, float32, bit for bit."""
    g, valid, length = _groups(lines, group)
    count = valid.sum(dim=-1).to(torch.float32)
    mean = (g.abs().sum(dim=-1) / count).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).to(torch.float32)
    out = (2 * (g >= 0).to(torch.float32) - 1) * mean.unsqueeze(-1)
    return out.reshape(*out.shape[:-2], -1)[..., :length]


def _quantized_pair(f: SplitFactors, bits: int | None, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All r components of B' and A' quantized (bits None: 1-bit sign·mean), float64."""
    b_lines = f.b.transpose(1, 2)  # groups run down each column of B'
    if bits is None:
        qb, qa = fake_binary(b_lines, group), fake_binary(f.a, group)
    else:
        qb, qa = fake_affine(b_lines, bits, group), fake_affine(f.a, bits, group)
    return qb.transpose(1, 2).double(), qa.double()


def dequantized_factors(f: SplitFactors, config: AdapterQuantConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B̂, Â)`` of every module of the batch under one config, float32 (what ``apply`` writes)."""
    h = config.high
    rank = f.b.shape[2]
    config.check_rank(rank)
    hb, ha = _quantized_pair(f, config.bits, config.group) if h else (f.b[:, :, :0], f.a[:, :0])
    if config.low_bits and h < rank:
        lb, la = _quantized_pair(f, None, config.group)
    else:
        lb, la = torch.zeros_like(f.b), torch.zeros_like(f.a)
    b = torch.cat([hb[:, :, :h], lb[:, :, h:]], dim=2)
    a = torch.cat([ha[:, :h], la[:, h:]], dim=1)
    return b.float(), a.float()


def config_errors(f: SplitFactors, configs: Sequence[AdapterQuantConfig]) -> np.ndarray:
    """Exact ``‖B'A' − B̂Â‖²_F`` for every module of the batch (rows) and config (columns)."""
    n, _, rank = f.b.shape
    out = np.full((n, len(configs)), np.nan)
    by_group: dict[int, list[int]] = {}
    for j, cfg in enumerate(configs):
        if cfg.high <= rank:
            by_group.setdefault(cfg.group, []).append(j)
    for group, cols in by_group.items():
        need_low = any(configs[j].low_bits and configs[j].high < rank for j in cols)
        lb, la = _quantized_pair(f, None, group) if need_low else (torch.zeros_like(f.b), torch.zeros_like(f.a))
        # Gram blocks of [B', B_low] and [A'; A_low]; B'ᵀB' = A'A'ᵀ = S exactly.
        base_b = torch.cat([f.b, lb], dim=2)
        base_a = torch.cat([f.a, la], dim=1)
        gb_base = base_b.transpose(1, 2) @ base_b
        ga_base = base_a @ base_a.transpose(1, 2)
        for bits in sorted({configs[j].bits for j in cols}):
            hb, ha = _quantized_pair(f, bits, group)
            gb = _stack_gram(gb_base, hb.transpose(1, 2) @ base_b, hb.transpose(1, 2) @ hb)
            ga = _stack_gram(ga_base, ha @ base_a.transpose(1, 2), ha @ ha.transpose(1, 2))
            m = gb * ga  # (N, 3r, 3r) in the order [B', B_low, B_high]
            js = [j for j in cols if configs[j].bits == bits]
            w = torch.zeros(len(js), 3 * rank, dtype=torch.float64)
            for row, j in enumerate(js):
                h, low = configs[j].high, configs[j].low_bits
                w[row, :rank] = 1.0
                w[row, rank + h: 2 * rank] = -float(low)
                w[row, 2 * rank: 2 * rank + h] = -1.0
            err = torch.einsum("ki,nij,kj->nk", w, m, w)
            out[:, js] = err.clamp_min(0).numpy()
    return out


def _stack_gram(base: torch.Tensor, cross: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """The symmetric Gram of [base..., high] from its blocks (cross = highᵀ·base)."""
    top = torch.cat([base, cross.transpose(1, 2)], dim=2)
    bottom = torch.cat([cross, high], dim=2)
    return torch.cat([top, bottom], dim=1)


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
        parts["B.high"] = quantize_affine(b[:, :h].float().contiguous(), config.bits, config.group, dim=0)
        parts["A.high"] = quantize_affine(a[:h].float().contiguous(), config.bits, config.group, dim=1)
    if config.low_bits and h < rank:
        parts["B.low"] = quantize_binary(b[:, h:].float().contiguous(), config.group, dim=0)
        parts["A.low"] = quantize_binary(a[h:].float().contiguous(), config.group, dim=1)
    return parts
