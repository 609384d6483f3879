"""Tests of bitalloc.lowrank.state: validation, Fisher weights, the lazily packed Q, malloc."""

from __future__ import annotations

import pytest
import torch
from lowrank_helpers import cfg, sq, weight

from bitalloc.lowrank import Decomposition, decompose, decompose_many, fisher_scalings
from bitalloc.lowrank.state import DeferredQ, Matrix, keep_freed_memory, minus_low
from bitalloc.quant import quantize


def test_bad_input_raises_clear_errors():
    W = weight()
    c = cfg("nf4-g64-s8x256-r8")
    bad = W.clone()
    bad[3, 4] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decompose(bad, c)
    with pytest.raises(ValueError, match="NaN"):
        decompose_many(bad, [c])
    with pytest.raises(ValueError, match=r"rank 65 .*64x96"):
        decompose(W, cfg("nf4-g64-s8x256-r65"))
    with pytest.raises(ValueError, match=r"rank 65"):
        decompose_many(W, [c, cfg("nf4-g64-s8x256-r65")])
    with pytest.raises(ValueError, match=r"shape \(64, 95\).*\(64, 96\)"):
        decompose(W, c, torch.ones(64, 95))
    neg = torch.ones_like(W)
    neg[0, 0] = -1.0
    with pytest.raises(ValueError, match="non-negative"):
        decompose(W, c, neg)
    with pytest.raises(ValueError, match="2-D"):
        decompose(W[0], c)
    with pytest.raises(ValueError, match="expected a QuantConfig"):
        decompose(W, "nf4-g64-s8x256-r8")


def test_fisher_error_on_a_hand_example():
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    F = torch.tensor([[1.0, 0.0], [2.0, 0.5]])
    m = Matrix(W, F, seed=0)
    plain, weighted = m.errors(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    assert plain == 30.0
    assert weighted == pytest.approx(1 * 1 + 0 * 4 + 2 * 9 + 0.5 * 16)
    d_r, d_c = fisher_scalings(F)
    assert torch.allclose(d_r.flatten(), torch.tensor([0.5, 1.25]).sqrt())
    assert torch.allclose(d_c.flatten(), torch.tensor([1.5, 0.25]).sqrt())
    # the floor, relative to the largest weight
    d_r, _ = fisher_scalings(torch.tensor([[1.0, 1.0], [0.0, 0.0]]), floor=0.25)
    assert torch.allclose(d_r.flatten(), torch.tensor([1.0, 0.5]))


def test_q_is_packed_lazily_and_equals_the_evaluated_one():
    W = weight(seed=21)
    c = cfg("nf3-g32-s4x16-fp32-r8")
    d = decompose(W, c)
    assert isinstance(d.__dict__["_q"], DeferredQ)  # nothing packed yet
    q = d.q
    assert q is d.q and not isinstance(d.__dict__["_q"], DeferredQ)  # packed once, cached
    # the loop quantizes W - L1 L2 as one fused product, and so does Q
    target = minus_low(W, d.l1, d.l2)
    assert torch.allclose(target, W - d.l1 @ d.l2, rtol=0, atol=1e-6)
    assert torch.equal(q.dequantize(), quantize(target, c).dequantize())
    assert d.error == pytest.approx(sq(W - q.dequantize() - d.l1 @ d.l2), rel=1e-6)
    # a Decomposition built by hand keeps a plain QuantizedTensor
    plain = Decomposition(c, q, d.l1, d.l2, d.error, None, 0)
    assert plain.q is q


def test_keep_freed_memory_is_idempotent_and_a_policy_can_leave_malloc_alone(monkeypatch):
    import bitalloc.lowrank.state as state

    keep_freed_memory()
    keep_freed_memory()  # once per process; a second call is a no-op
    assert state._MALLOC_TUNED
    monkeypatch.setattr(state, "_MALLOC_TUNED", False)
    Matrix(weight(), None, 0, tune_malloc=False)
    assert not state._MALLOC_TUNED
    Matrix(weight(), None, 0)
    assert state._MALLOC_TUNED


def test_generator_repeats_its_seed():
    m = Matrix(weight(), None, seed=7)
    a = torch.randn(4, generator=m.generator())
    assert torch.equal(a, torch.randn(4, generator=m.generator()))
    assert not torch.equal(a, torch.randn(4, generator=Matrix(weight(), None, seed=8).generator()))
