"""Tests of bitalloc.lowrank.rank_step: the small SVDs, the Cholesky pass, the split target."""

from __future__ import annotations

import math

import pytest
import torch
from lowrank_helpers import cfg, weight

import bitalloc.lowrank.rank_step as rank_step
from bitalloc.lowrank import LoopPolicy, decompose
from bitalloc.lowrank.loop import Iterate
from bitalloc.lowrank.rank_step import SplitTarget, cpu_has_bf16, native_bf16, orth, range_svd, small_svd, step_target


@pytest.mark.parametrize("shape", [(72, 576), (20, 300), (5, 7)])
def test_small_svd_matches_torch_svd(shape):
    g = torch.Generator().manual_seed(23)
    B = torch.randn(*shape, generator=g) * torch.logspace(0, -3, shape[0]).unsqueeze(1)
    U, S, V = small_svd(B)
    S_ref = torch.linalg.svdvals(B)
    assert torch.allclose(S, S_ref, rtol=1e-4, atol=1e-6 * float(S_ref[0]))
    assert torch.allclose((U * S) @ V.T, B, atol=1e-5 * float(S_ref[0]))
    assert torch.allclose(U.T @ U, torch.eye(shape[0]), atol=1e-5)


def test_cholesky_subspace_pass_matches_the_householder_one():
    g = torch.Generator().manual_seed(29)
    R = torch.randn(300, 120, generator=g) @ torch.diag(torch.logspace(0, -2, 120)) @ torch.randn(120, 120, generator=g)
    Y = R @ torch.randn(120, 24, generator=g)
    U, S, V, basis = range_svd(R, Y, 16)
    Q = orth(Y)
    Ub, S_ref, V_ref = small_svd(Q.T @ R)
    assert U.shape == (300, 16) and S.shape == (16,) and V.shape == (120, 16) and basis.shape == (120, 24)
    assert torch.allclose(S, S_ref[:16], rtol=1e-4)
    assert torch.allclose((U * S) @ V.T, ((Q @ Ub[:, :16]) * S_ref[:16]) @ V_ref[:, :16].T, atol=1e-4 * float(S[0]))
    assert torch.allclose(U.T @ U, torch.eye(16), atol=1e-4)


def test_cholesky_subspace_pass_refuses_a_rank_deficient_range():
    g = torch.Generator().manual_seed(31)
    R = torch.randn(50, 40, generator=g)
    Y = R @ torch.randn(40, 6, generator=g)
    Y[:, 5] = Y[:, 4]  # a repeated column: the Gram matrix is singular
    assert range_svd(R, Y, 4) is None


def _split_target(seed: int = 37):
    """A split step target: two big low-rank terms (momentum) and a small dense part."""
    g = torch.Generator().manual_seed(seed)
    rows, cols, r = 48, 80, 5
    s1, s2 = torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g)
    p1, p2 = torch.randn(rows, r, generator=g), torch.randn(r, cols, generator=g)
    D = 1e-3 * torch.randn(rows, cols, generator=g)
    target = SplitTarget([(1.3, s1, s2), (-0.3, p1, p2)], 1.5, D)
    dense = 1.3 * (s1 @ s2) - 0.3 * (p1 @ p2) + 1.5 * D
    return target, dense, g


def test_split_target_rounds_only_its_dense_part():
    target, dense, g = _split_target()
    assert target.shape == dense.shape
    assert torch.allclose(target.dense(), dense, rtol=0, atol=1e-5)
    V = torch.linalg.qr(torch.randn(80, 6, generator=g))[0]
    Y = torch.randn(48, 6, generator=g)
    D = target.D
    # the dense part goes through bfloat16 (inputs rounded to 2^-9 relative, float32 sums):
    # the error is bounded by that part's own size, far below a bfloat16 rounding of the
    # whole target (the low-rank terms are ~1000x larger)
    bound_right = 1.5 * (D.abs() @ V.abs()) * 2**-7 + 1e-5
    bound_left = 1.5 * (Y.abs().T @ D.abs()) * 2**-7 + 1e-5
    assert bool(((target.matmul(V) - dense @ V).abs() <= bound_right).all())
    assert bool(((target.rmatmul_t(Y) - Y.T @ dense).abs() <= bound_left).all())
    whole_rounded = (dense.bfloat16().float() @ V - dense @ V).abs().max()
    assert (target.matmul(V) - dense @ V).abs().max() < 0.1 * whole_rounded


def test_split_target_weighting_matches_the_dense_one():
    target, dense, g = _split_target(41)
    d_r, d_c = torch.rand(48, 1, generator=g) + 0.5, torch.rand(1, 80, generator=g) + 0.5
    assert torch.allclose(target.weighted(d_r, d_c).dense(), d_r * dense * d_c, rtol=0, atol=1e-5)


def test_step_target_is_split_where_bfloat16_products_are_native(monkeypatch):
    g = torch.Generator().manual_seed(43)
    W = torch.randn(64, 64, generator=g)

    def iterate(rows: int, cols: int):
        l1, l2 = torch.randn(rows, 3, generator=g), torch.randn(3, cols, generator=g)
        resid = 1e-3 * torch.randn(rows, cols, generator=g)
        return Iterate(None, W - l1 @ l2, resid, l1, l2, None, None, 0.0, None)

    cur, prev = iterate(64, 64), iterate(64, 64)
    low, low_prev = cur.l1 @ cur.l2, prev.l1 @ prev.l2
    expected = low + 1.5 * cur.resid + 0.3 * (low - low_prev)
    monkeypatch.setattr(rank_step, "native_bf16", lambda *device: True)
    at = LoopPolicy()
    split = step_target(W, cur, prev, 1.5, 0.3, at)
    assert isinstance(split, SplitTarget)
    assert torch.allclose(split.dense(), expected, rtol=0, atol=1e-5)
    dense = step_target(W, cur, prev, 1.5, 0.3, at.replace(split_target=False))
    assert isinstance(dense, torch.Tensor) and torch.allclose(dense, expected, rtol=0, atol=1e-5)
    monkeypatch.setattr(rank_step, "native_bf16", lambda *device: False)  # emulated bfloat16: float32
    assert isinstance(step_target(W, cur, None, 1.5, 0.3, at), torch.Tensor)


def test_native_bf16_reads_the_cpu_flags():
    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 avx512_vnni\n"
    sapphire = "flags\t: fpu avx512f amx_bf16 amx_tile\n"
    skylake = "flags\t: fpu avx2 avx512f avx512bw\nbugs\t: avx512_bf16\n"  # not in 'flags'
    assert cpu_has_bf16(zen4) and cpu_has_bf16(sapphire)
    assert not cpu_has_bf16(skylake) and not cpu_has_bf16("")
    assert native_bf16("meta") is False
    assert isinstance(native_bf16("cpu"), bool)


def test_native_bf16_without_a_readable_cpuinfo_is_false(monkeypatch):
    import builtins

    real_open = builtins.open

    def no_cpuinfo(path, *args, **kwargs):
        if str(path) == "/proc/cpuinfo":
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", no_cpuinfo)
    native_bf16.cache_clear()
    try:
        assert native_bf16("cpu") is False  # unknown: the float32 target, never an error
    finally:
        native_bf16.cache_clear()


@pytest.mark.parametrize("name, worst", [("nf3-g64-s8x64-r8", 1.03), ("nf8-g64-s8x64-r8", 1.15)])
def test_split_loop_ends_near_the_float32_one(monkeypatch, name, worst):
    """The loop is chaotic (NF8 most): single results move either way; on average they agree."""
    calls = []
    matmul = SplitTarget.matmul
    monkeypatch.setattr(SplitTarget, "matmul", lambda self, V: calls.append(1) or matmul(self, V))
    monkeypatch.setattr(rank_step, "native_bf16", lambda *device: True)  # the path, wherever it is fast
    split_policy = LoopPolicy()
    ratios = []
    for seed in (47, 48, 49):
        W = weight(160, 200, seed=seed)  # above the exact-SVD size: the subspace pass runs
        F = torch.rand(W.shape, generator=torch.Generator().manual_seed(seed)) ** 2
        for fisher in (None, F):
            calls.clear()
            split = decompose(W, cfg(name), fisher, policy=split_policy)
            assert calls, "the split path was not taken"
            dense = decompose(W, cfg(name), fisher, policy=split_policy.replace(split_target=False))
            assert split.objective <= decompose(W, cfg(name).replace(rank=0), fisher).objective
            ratios.append(split.objective / dense.objective)
    assert max(ratios) <= worst
    assert sum(math.log(x) for x in ratios) / len(ratios) <= 0.03  # not worse on average


def test_cold_starts_share_one_exact_svd_of_w(monkeypatch):
    from bitalloc.lowrank import decompose_many
    from bitalloc.quant import quantize_dequantize

    from lowrank_helpers import sq

    W = weight(160, 256, rank=10, seed=30)  # later steps take the randomized subspace path
    real_svd = torch.linalg.svd
    shapes = []

    def counting_svd(A, *args, **kwargs):
        shapes.append(tuple(A.shape))
        return real_svd(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "svd", counting_svd)
    cold = [cfg(n) for n in ("nf2-g64-s8x256-r8", "nf2-g32-s4x256-r8", "nf3-g64-s8x256-r8", "nf3-g64-s2x256-r4")]
    many = decompose_many(W, cold)
    assert shapes == [(160, 256)]  # one SVD of W for four cold starts at ranks 8 and 4
    # the first iterate quantizes against the exact best rank-r part of W (balanced, bf16)
    U, S, Vh = real_svd(W, full_matrices=False)
    for d in many:
        r, s = d.rank, S[: d.rank].sqrt()
        l1 = (U[:, :r] * s).bfloat16().float()
        l2 = (s[:, None] * Vh[:r]).bfloat16().float()
        target = W - l1 @ l2
        first = sq(target - quantize_dequantize(target, d.cfg))
        assert d.history[0] == pytest.approx(first, rel=1e-4), d.cfg.name


def test_large_matrices_take_an_accurate_subspace_iteration_for_the_first_step(monkeypatch):
    from lowrank_helpers import sq

    W = weight(160, 256, rank=8, seed=32)
    c = cfg("nf3-g64-s8x256-r8")
    one_step = LoopPolicy(max_iters=1)
    exact = decompose(W, c, policy=one_step)
    large = one_step.replace(cold_exact_max_side=64)  # 160 x 256 now counts as large
    calls = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda *a, **k: calls.append(1) or real_svd(*a, **k))
    approx = decompose(W, c, policy=large)
    assert calls == []
    low_exact, low_approx = exact.l1 @ exact.l2, approx.l1 @ approx.l2
    assert sq(low_exact - low_approx) <= 1e-4 * sq(low_exact)
    again = decompose(W, c, policy=large)
    assert torch.equal(again.l1, approx.l1)  # seeded: the same every time
