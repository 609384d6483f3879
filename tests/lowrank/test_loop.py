"""Tests of bitalloc.lowrank.loop: decompose, the best iterate, Fisher weighting, stopping."""

from __future__ import annotations

import pytest
import torch
from lowrank_helpers import cfg, clipped, reference_module, sq, weight

import bitalloc.lowrank.loop as loop
from bitalloc.lowrank import Decomposition, LoopPolicy, decompose
from bitalloc.lowrank.loop import converged
from bitalloc.quant import quantize

EXHAUSTIVE = LoopPolicy(tol=1e-12, stop_window=0.0)  # runs to max_iters


def capped(n: int, base: LoopPolicy = EXHAUSTIVE) -> LoopPolicy:
    return base.replace(max_iters=n)


# ----- rank 0 and basic contracts -------------------------------------------------------------
@pytest.mark.parametrize("name", ["nf4-g64-s8x256-r0", "nf2-g16-s16-r0", "nf3-g32-s4x16-fp32-r0"])
def test_rank0_equals_quantize_exactly(name):
    W = weight()
    d = decompose(W, cfg(name))
    q = quantize(W, cfg(name))
    assert torch.equal(d.q.dequantize(), q.dequantize())
    # the same squares, summed in float64 in another order (the CPU kernel's lanes)
    assert d.error == pytest.approx(sq(W - q.dequantize()), rel=1e-12)
    assert d.l1.shape == (64, 0) and d.l2.shape == (0, 96)
    assert d.iterations == 0 and d.error_fisher is None
    assert torch.equal(d.reconstruct(), q.dequantize().float())


def test_error_is_that_of_the_reconstruction_and_factors_are_bf16():
    W = weight()
    d = decompose(W, cfg("nf3-g32-s8x64-r8"))
    assert isinstance(d, Decomposition)
    assert d.l1.shape == (64, 8) and d.l2.shape == (8, 96) and d.rank == 8
    assert d.l1.dtype == torch.float32 and d.l2.dtype == torch.float32
    # bf16 storage: the returned factors are exactly bf16 values
    assert torch.equal(d.l1, d.l1.bfloat16().float())
    assert torch.equal(d.l2, d.l2.bfloat16().float())
    recon = d.q.dequantize().float() + d.l1 @ d.l2
    assert torch.allclose(d.reconstruct(), recon)
    assert d.error == pytest.approx(sq(W - recon), rel=1e-5)
    assert d.iterations >= 1


@pytest.mark.parametrize(
    "name", ["nf2-g64-s8x256", "nf3-g16-s2x16", "nf4-g64-s8x256-fp32", "nf8-g32-s4x64", "nf4-g16-s16"]
)
def test_lowrank_never_worse_than_rank0(name):
    W = weight(seed=1)
    base = decompose(W, cfg(f"{name}-r0")).error
    for r in (1, 4, 16):
        assert decompose(W, cfg(f"{name}-r{r}")).error <= base


def test_best_iterate_is_returned():
    W = weight(seed=2)
    for name in ("nf2-g16-s2x16-r8", "nf3-g64-s8x256-r8", "nf8-g16-s3x64-r8"):
        d = decompose(W, cfg(name), policy=capped(15))
        assert d.history, name
        assert d.error == min(d.history) <= d.history[-1]


def test_max_iters_and_policy_are_checked():
    W, c = weight(), cfg("nf4-g64-s8x256-r8")
    with pytest.raises(ValueError, match="max_iters"):
        decompose(W, c, policy=LoopPolicy(max_iters=0))
    with pytest.raises(ValueError, match="LoopPolicy"):
        decompose(W, c, policy={"tol": 0.1})


# ----- against the faithful LQ-LoRA reference -----------------------------------------------
@pytest.mark.parametrize(
    "name",
    ["nf2-g64-s8x256-r8", "nf3-g32-s4x64-r8", "nf3-g16-s2x256-r8", "nf4-g64-s8x16-fp32-r8",
     "nf4-g16-s3x16-r8", "nf8-g32-s2x64-r8"],
)
def test_not_worse_than_lqlora_reference(name):
    ref = reference_module()
    W = weight(96, 160, rank=8, seed=3)
    c = cfg(name)
    r = ref.lqlora_reference(W, c)
    d = decompose(W, c)
    assert d.error <= 1.01 * r.error, (d.error, r.error)
    # the reference's error is of the factors it returns, stored as the config says
    stored = r.q + r.l1.bfloat16().float() @ r.l2.bfloat16().float()
    assert r.error == pytest.approx(sq(W - stored), rel=1e-5)


def test_reference_stops_at_the_first_rise_and_keeps_the_last_iterate():
    ref = reference_module()
    W = weight(seed=4)
    r = ref.lqlora_reference(W, cfg("nf3-g64-s8x256-r8"))
    assert 1 <= r.iterations <= 100
    assert r.error_unstored == pytest.approx(sq(W - r.q - r.l1 @ r.l2), rel=1e-5)


# ----- the subspace path and warm starts -----------------------------------------------------
def test_randomized_subspace_path_and_warm_start():
    # 160 x 256 with r = 8 takes the randomized / subspace-iteration path, not the exact SVD
    W = weight(160, 256, rank=10, seed=5)
    c = cfg("nf3-g64-s4x64-r8")
    cold = decompose(W, c)
    assert cold.basis is not None and cold.basis.shape[0] == 256
    warm = decompose(W, c, init=cold)
    assert warm.history[0] == pytest.approx(cold.error, rel=1e-6)  # same factors, same Q
    assert warm.error <= cold.error
    # a pair of factors works too, and a neighbouring config starts from them
    other = decompose(W, cfg("nf3-g64-s3x64-r8"), init=(cold.l1, cold.l2))
    assert other.error <= other.history[0]
    # a larger-rank start is trimmed to the leading components
    low = decompose(W, cfg("nf3-g64-s4x64-r4"), init=cold, policy=LoopPolicy(max_iters=0))
    assert low.l1.shape == (160, 4) and low.iterations == 0
    assert torch.equal(low.l1, cold.l1[:, :4])


def test_bad_init_raises():
    W = weight()
    with pytest.raises(ValueError, match="do not fit"):
        decompose(W, cfg("nf4-g64-s8x256-r4"), init=(torch.zeros(10, 4), torch.zeros(4, 96)))
    with pytest.raises(ValueError, match="init must be"):
        decompose(W, cfg("nf4-g64-s8x256-r4"), init="previous")


# ----- Fisher-weighted variant ---------------------------------------------------------------
def test_fisher_error_matches_the_reconstruction():
    W = weight(seed=6)
    F = torch.rand(W.shape, generator=torch.Generator().manual_seed(6)) ** 2
    d = decompose(W, cfg("nf3-g32-s8x64-r8"), F)
    recon = d.reconstruct()
    assert d.error == pytest.approx(sq(W - recon), rel=1e-5)
    assert d.error_fisher == pytest.approx(float((F.double() * (W - recon).double() ** 2).sum()), rel=1e-5)
    assert d.objective == d.error_fisher == min(d.history)


def test_uniform_fisher_equals_plain_up_to_the_scalar():
    W = weight(seed=7)
    c = cfg("nf4-g64-s4x64-r8")
    plain = decompose(W, c, policy=capped(8))
    # F = 4: the weights are 2, and scaling by a power of two commutes with float rounding, so
    # the weighted loop takes exactly the plain loop's steps
    weighted = decompose(W, c, torch.full(W.shape, 4.0), policy=capped(8))
    assert weighted.iterations == plain.iterations == 8
    for a, b in zip(plain.history, weighted.history):
        assert b == pytest.approx(4.0 * a, rel=1e-12)
    assert weighted.error == pytest.approx(plain.error, rel=1e-12)
    assert weighted.error_fisher == pytest.approx(4.0 * weighted.error, rel=1e-6)
    # F = 3: the same up to rounding, which the loop amplifies (it is chaotic), so one step
    other = decompose(W, c, torch.full(W.shape, 3.0), policy=capped(1))
    assert other.history[0] == pytest.approx(3.0 * plain.history[0], rel=1e-4)


def test_nonuniform_fisher_lowers_the_weighted_error():
    # a few rows and columns matter 100x more: the weighted SVD spends the rank on them
    W = 0.02 * torch.randn(64, 96, generator=torch.Generator().manual_seed(8))
    F = torch.ones(64, 96)
    F[:8] *= 100.0
    F[:, :12] *= 100.0
    c = cfg("nf3-g32-s8x64-r8")
    plain = decompose(W, c)
    weighted = decompose(W, c, F)
    plain_weighted_error = float((F.double() * (W - plain.reconstruct()).double() ** 2).sum())
    assert weighted.error_fisher < 0.95 * plain_weighted_error


def test_fisher_zero_rows_are_floored():
    W = weight(seed=9)
    F = torch.rand(W.shape, generator=torch.Generator().manual_seed(9))
    F[:5] = 0.0
    d = decompose(W, cfg("nf4-g64-s8x256-r4"), F)
    assert torch.isfinite(d.l1).all() and torch.isfinite(d.l2).all()
    d0 = decompose(W, cfg("nf4-g64-s8x256-r4"), torch.zeros(W.shape))
    assert d0.error_fisher == 0.0


# ----- NF8 factors ---------------------------------------------------------------------------
def test_nf8_factors_are_stored_and_counted():
    W = weight(seed=10)
    c8 = cfg("nf3-g64-s8x256-r16-lr8")
    d = decompose(W, c8)
    assert d.l1_q is not None and d.l2_q is not None
    assert d.l1_q.shape == (16, 64) and d.l2_q.shape == (16, 96)  # L1 stored transposed
    assert torch.equal(d.l1, d.l1_q.dequantize().float().T)
    assert torch.equal(d.l2, d.l2_q.dequantize().float())
    assert d.error == pytest.approx(sq(W - d.q.dequantize() - d.l1 @ d.l2), rel=1e-5)
    d16 = decompose(W, cfg("nf3-g64-s8x256-r16"))
    assert d16.l1_q is None
    assert d.error != d16.error


# ----- stepping and stopping -----------------------------------------------------------------
def test_plain_steps_do_not_stop_at_the_first_rise():
    # NF2 takes plain steps; a rise does not end the loop (the best-iterate rule does): it
    # goes on from the risen iterate, and the best iterate is no worse than any seen
    W = weight(96, 160, rank=8, seed=24)
    d = decompose(W, cfg("nf2-g16-s2x64-r8"), policy=capped(12))
    h = d.history
    rises = [i for i in range(1, len(h)) if h[i] > h[i - 1]]
    assert rises and len(h) > rises[0] + 1
    assert d.objective == min(h)


def test_a_loose_tolerance_stops_after_patience_steps_and_the_cap_wins():
    W = weight(96, 160, rank=8, seed=31)
    c = cfg("nf4-g64-s8x256-r8")
    loose = LoopPolicy(tol=0.5)  # a tolerance that stops as soon as it may
    cold = decompose(W, c, policy=loose)
    assert cold.iterations == loose.patience + 1
    warm = decompose(W, c, init=cold, policy=loose)
    assert warm.iterations == loose.patience
    assert decompose(W, c, policy=LoopPolicy(max_iters=2)).iterations == 2


def test_a_bump_in_a_fast_descent_is_not_convergence():
    assert not converged([10.0, 8.0, 6.4, 5.1, 5.1, 5.1], 0.01, 2, 3.0)  # 36% lower than 4 steps ago
    assert converged([5.2, 5.15, 5.12, 5.11, 5.1, 5.1], 0.01, 2, 3.0)
    assert converged([10.0, 8.0, 6.4, 5.1, 5.1, 5.1], 0.01, 2, 0.0)
    assert not converged([6.0, 5.5, 5.0], 0.01, 2, 3.0)  # fell 17% over the last two steps


def test_coarse_nf8_keeps_its_long_steps_after_a_rise(monkeypatch):
    def run(name):
        etas = []
        real = loop.step_target

        def recording(W, cur, prev, eta, momentum, policy):
            etas.append(eta)
            return real(W, cur, prev, eta, momentum, policy)

        monkeypatch.setattr(loop, "step_target", recording)
        d = decompose(clipped(), cfg(name), policy=capped(30))
        monkeypatch.undo()
        rises = sum(b > a for a, b in zip(d.history, d.history[1:]))
        return etas, rises

    relax8, relax4 = LoopPolicy().relax_momentum(8)[0], LoopPolicy().relax_momentum(4)[0]
    etas, rises = run("nf8-g16-s2x64-r8")
    assert rises >= 1 and set(etas) == {relax8}  # rose, and never retreated
    etas, rises = run("nf4-g16-s2x64-r8")  # other codes retreat to plain steps after a rise
    assert rises >= 1 and min(etas) < relax4 and min(etas) >= 1.0
