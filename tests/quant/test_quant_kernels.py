"""The compiled NF rounding kernels (bitalloc.quant.kernels) equal the tensor code bit for bit.

Each test runs the same call with the kernels on and off (``kernels.available`` patched) and
compares; the tensor code is itself tested against ``quantize(...).dequantize()``.
"""

import pytest
import torch

from bitalloc.configs import QuantConfig, config_space
from bitalloc.quant import blockwise, kernels, quantize, quantize_dequantize, quantize_residual
from bitalloc.quant.nf import _LUT_BINS, _cached

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

LQLORA = config_space("lqlora", ranks=(0,))


def both(monkeypatch, fn):
    """``fn()`` with the kernels, then without them."""
    fast = fn()
    with monkeypatch.context() as m:
        m.setattr(kernels, "available", lambda: False)
        slow = fn()
    return fast, slow


def adversarial_row(bits: int) -> torch.Tensor:
    """1.0 (so a block's absmax, and with fp16 scales its scale, is exactly 1), then each
    midpoint, the floats either side of it, bin edges of the lookup table and values past +-1."""
    _, mids = _cached(bits, "cpu")
    edges = torch.arange(0, _LUT_BINS + 1, 97, dtype=torch.float32) / (_LUT_BINS // 2) - 1
    vals = torch.cat([
        mids, torch.nextafter(mids, torch.full_like(mids, 2.0)),
        torch.nextafter(mids, torch.full_like(mids, -2.0)), edges,
        torch.tensor([0.0, -0.0, 1.0, -1.0, 0.999999, -0.999999]),
    ])
    return vals


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kernels_round_midpoints_and_edges_like_the_tensor_code(bits, monkeypatch):
    vals = adversarial_row(bits)
    block = 16
    # every block: 1.0 first (scale exactly 1 with fp16 scales), then 15 test values
    chunks = [torch.cat([torch.ones(1), vals[i : i + block - 1]]) for i in range(0, vals.numel(), block - 1)]
    chunks[-1] = torch.cat([chunks[-1], torch.zeros(block - chunks[-1].numel())])
    W = torch.stack(chunks).reshape(1, -1)
    cfg = QuantConfig(bits=bits, block=block, scale_bits=16)
    fast, slow = both(monkeypatch, lambda: quantize_dequantize(W, cfg))
    assert torch.equal(fast, slow)
    assert torch.equal(fast, quantize(W, cfg).dequantize())


@pytest.mark.parametrize("shape", [(1, 1), (3, 7), (17, 33), (5, 300), (64, 64), (40, 576)])
def test_kernels_match_for_every_lqlora_config(shape, monkeypatch, gen):
    W = 0.02 * torch.randn(*shape, generator=gen)
    W.view(-1)[:: max(1, W.numel() // 5)] *= 50.0  # outliers: clipped by coarse scales
    W[shape[0] // 2] = 0.0  # zero blocks: zero scales
    for cfg in LQLORA:
        fast, slow = both(monkeypatch, lambda: quantize_dequantize(W, cfg))
        assert torch.equal(fast, slow), cfg.name
        fast, slow = both(monkeypatch, lambda: quantize_residual(W, cfg))
        assert torch.equal(fast, slow), cfg.name
        assert torch.equal(fast, W - quantize(W, cfg).dequantize()), cfg.name


def test_kernels_match_across_slabs(monkeypatch, gen):
    W = 0.02 * torch.randn(40, 100, generator=gen)  # 100 columns: padded blocks of 64
    monkeypatch.setattr(blockwise, "_SLAB_ELEMENTS", 8 * 128)  # 8-row slabs
    for cfg in LQLORA[::9]:
        fast, slow = both(monkeypatch, lambda: quantize_residual(W, cfg))
        assert torch.equal(fast, slow), cfg.name


def test_kernels_leave_other_dtypes_and_noncontiguous_input_right(monkeypatch, gen):
    cfg = QuantConfig(bits=4, block=64, scale_bits=8, scale_block=256)
    W = 0.02 * torch.randn(128, 64, generator=gen)
    for x in (W.T, W.to(torch.float16), W[:, :40]):
        fast, slow = both(monkeypatch, lambda: quantize_dequantize(x, cfg))
        assert fast.dtype == x.dtype and torch.equal(fast, slow)


@pytest.mark.parametrize("block", [16, 64, 7])
def test_block_absmax_equals_the_tensor_code_with_short_last_blocks(block, gen):
    W = torch.randn(9, 100, generator=gen)
    W[3] = 0.0
    assert torch.equal(kernels.block_absmax(W, block), blockwise._absmax(W, block))


def test_sum_squares_is_the_float64_sum_of_float32_squares(gen):
    x = torch.randn(1001, generator=gen) * 3
    expected = float((x * x).sum(dtype=torch.float64))
    assert kernels.sum_squares(x) == pytest.approx(expected, rel=1e-13)
    assert kernels.sum_squares(torch.zeros(3)) == 0.0


def test_available_can_be_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("BITALLOC_NO_NUMBA", "1")
    assert not kernels.available()
    monkeypatch.setenv("BITALLOC_NO_NUMBA", "0")
    assert kernels.available()


def test_kernels_fall_back_to_no_disk_cache_and_then_to_tensor_code(monkeypatch):
    import numba

    calls = []
    real_build = kernels._build

    def build(nb, cache):
        calls.append(cache)
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return real_build(nb, cache)

    monkeypatch.setattr(kernels, "_build", build)
    kernels._compiled.cache_clear()
    try:
        assert kernels._compiled() is not None and calls == [True, False]
        monkeypatch.setattr(kernels, "_build", lambda nb, cache: (_ for _ in ()).throw(RuntimeError("no")))
        kernels._compiled.cache_clear()
        assert not kernels.available()  # callers then use the tensor code
    finally:
        monkeypatch.undo()
        kernels._compiled.cache_clear()
    assert kernels.available() and numba is not None
