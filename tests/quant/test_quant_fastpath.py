"""The fast paths of bitalloc.quant are bit-identical to the definitions they replace.

* ``quantize_dequantize(W, cfg)`` == ``quantize(W, cfg).dequantize()`` (no packing);
* the lookup-table NF encoder == ``torch.bucketize`` on the midpoints;
* ``roundtrip_block_scales`` == ``decode_block_scales(encode_block_scales(...))``.
"""

import logging

import pytest
import torch

from bitalloc.configs import QuantConfig, config_space
from bitalloc.quant import nf_codebook, nf_decode, nf_encode, quantize, quantize_dequantize
from bitalloc.quant.nf import _LUT_BINS, _build_lut, _cached, _lut, nf_encode_index, nf_round
from bitalloc.quant.scales import decode_block_scales, encode_block_scales, roundtrip_block_scales

LQLORA = config_space("lqlora", ranks=(0,))
DEFAULT = config_space("default", ranks=(0,))
SHAPES = [(1, 1), (3, 7), (17, 33), (5, 300), (130, 66), (64, 64), (2, 17)]


def weights(shape, gen, kind):
    rows, cols = shape
    W = 0.02 * torch.randn(rows, cols, generator=gen)
    if kind == "outliers":
        W.view(-1)[:: max(1, W.numel() // 5)] *= 50.0
    elif kind == "zero-rows":
        W[::2] = 0.0
    elif kind == "constant":
        W.fill_(0.5)
    return W


# ----- quantize_dequantize -------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("kind", ["gauss", "outliers", "zero-rows", "constant"])
def test_fast_path_equals_quantize_dequantize_for_every_lqlora_config(shape, kind, gen):
    W = weights(shape, gen, kind)
    for cfg in LQLORA:
        assert torch.equal(quantize_dequantize(W, cfg), quantize(W, cfg).dequantize()), cfg.name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_fast_path_keeps_dtype_and_matches_for_default_space(dtype, gen):
    W = (0.02 * torch.randn(33, 130, generator=gen)).to(dtype)
    for cfg in DEFAULT:
        fast = quantize_dequantize(W, cfg)
        assert fast.dtype == dtype and fast.shape == W.shape
        assert torch.equal(fast, quantize(W, cfg).dequantize()), cfg.name


def test_fast_path_on_a_real_sized_matrix(gen):
    W = 0.02 * torch.randn(192, 576, generator=gen)
    for cfg in LQLORA[::7]:
        assert torch.equal(quantize_dequantize(W, cfg, check=False), quantize(W, cfg).dequantize())


def test_fast_path_validates_unless_told_not_to(gen):
    cfg = QuantConfig(bits=4, block=64, scale_bits=8, scale_block=256)
    bad = torch.randn(4, 64, generator=gen)
    bad[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        quantize_dequantize(bad, cfg)
    with pytest.raises(ValueError, match="2-D"):
        quantize_dequantize(torch.zeros(3), cfg)


def test_fast_path_with_fp16_saturation_warns_like_quantize(caplog):
    W = torch.full((2, 64), 1e6)
    cfg = QuantConfig(bits=4, block=64, scale_bits=16)
    with caplog.at_level(logging.WARNING):
        fast = quantize_dequantize(W, cfg)
    assert "saturating" in caplog.text
    assert torch.equal(fast, quantize(W, cfg).dequantize())


# ----- the lookup-table NF encoder -----------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lookup_table_exists_for_every_codebook(bits):
    assert _build_lut(_cached(bits, "cpu")[1]) is not None
    assert _lut(bits, torch.device("cpu")) is not None


def _adversarial(bits: int) -> torch.Tensor:
    """Midpoints, bin edges and the ends, each with its float32 neighbours a few ulps away."""
    mids = _cached(bits, "cpu")[1]
    half = _LUT_BINS // 2
    edges = (torch.arange(_LUT_BINS + 1, dtype=torch.float64) / half - 1).float()
    specials = torch.tensor([0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 1e-38, 5.0, -7.0,
                             float("inf"), float("-inf"), 3.4e38, -3.4e38])
    base = torch.cat([mids, edges, specials, nf_codebook(bits)])
    out = [base]
    for direction in (float("inf"), float("-inf")):
        x = base
        for _ in range(4):
            x = torch.nextafter(x, torch.full_like(x, direction))
            out.append(x)
    return torch.cat(out)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_lookup_table_encoder_equals_bucketize(bits, gen):
    mids = _cached(bits, "cpu")[1]
    y = torch.cat([
        _adversarial(bits),
        torch.rand(200_000, generator=gen) * 2.4 - 1.2,
        torch.randn(200_000, generator=gen) * 0.3,
        (torch.rand(100_000, generator=gen) * 2 - 1) * 1e-3,
    ])
    y = y[torch.isfinite(y) | torch.isinf(y)]
    expected = torch.bucketize(y, mids)
    assert torch.equal(nf_encode_index(y, bits), expected)
    assert torch.equal(nf_encode(y, bits), expected.to(torch.uint8))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_nf_round_equals_the_decoded_nearest_code(bits, gen):
    levels, mids = _cached(bits, "cpu")
    y = torch.cat([_adversarial(bits), torch.rand(100_000, generator=gen) * 2.4 - 1.2])
    y = y[: y.numel() // 2 * 2]
    rounded = nf_round(y.view(-1, 2), bits)
    assert rounded.shape == (y.numel() // 2, 2)
    assert torch.equal(rounded.view(-1), levels[torch.bucketize(y, mids)])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_encoder_keeps_shape_and_casts_input(bits, gen):
    y = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64) * 0.5
    codes = nf_encode(y, bits)
    assert codes.shape == y.shape and codes.dtype == torch.uint8
    assert torch.equal(codes.long(), torch.bucketize(y.float(), _cached(bits, "cpu")[1]))
    assert nf_decode(codes, bits).shape == y.shape


def test_lookup_table_refuses_a_grid_that_does_not_fit():
    crowded = torch.tensor([0.1, 0.1000001, 0.5])  # two midpoints in one bin
    assert _build_lut(crowded) is None
    near_edge = torch.tensor([0.5 - 1e-7])  # just below an edge, within the rounding margin
    assert _build_lut(near_edge, n=4) is None
    on_edge = torch.tensor([-0.5, 0.0, 0.5])  # exactly on edges is safe
    assert _build_lut(on_edge, n=4) is not None


# ----- block scales without packing ----------------------------------------------------------
@pytest.mark.parametrize("cfg", [c for c in LQLORA if c.bits == 4 and c.block == 64] + DEFAULT[:4],
                         ids=lambda c: c.name)
def test_roundtrip_block_scales_equals_encode_then_decode(cfg, gen):
    for n in (1, 7, 300, 1000):
        absmax = torch.rand(n, generator=gen) * 0.1
        absmax[:: 5] = 0.0
        arrays = encode_block_scales(absmax, cfg)
        assert torch.equal(roundtrip_block_scales(absmax, cfg), decode_block_scales(arrays, n, cfg))
