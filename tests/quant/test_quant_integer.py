"""The ``int`` family: asymmetric integer codes with a zero point per block."""

import pytest
import torch

from bitalloc.configs import QuantConfig
from bitalloc.quant import QuantizedTensor, quantize, quantize_dequantize, quantize_residual
from bitalloc.quant.integer import block_step_lo, int_round, top_code

SHAPES = [(1, 1), (3, 7), (17, 33), (5, 300), (130, 66), (9, 65), (33, 1)]
def int_configs() -> list[QuantConfig]:
    """LQ-LoRA's grid in the integer family, plus fp16 scales: every scale option of the family."""
    grid = [QuantConfig(family="int", bits=b, block=g, scale_bits=sb, scale_block=sg, scale_dtype=dt)
            for b in (2, 3, 4, 8) for g in (16, 32, 64) for sb in (2, 3, 4, 8) for sg in (16, 64, 256)
            for dt in ("fp16", "fp32")]
    plain = [QuantConfig(family="int", bits=b, block=g, scale_bits=16) for b in (2, 3, 4, 8) for g in (16, 64, 128)]
    return grid + plain


INT_CONFIGS = int_configs()


def test_int3_g64_fp16_costs_autorounds_w3_count():
    cfg = QuantConfig.from_name("int3-g64-s16-r0")
    assert cfg.family == "int"
    assert cfg.bits_per_param(64, 6400) == 3 + 16 / 64 + 3 / 64 == 3.296875
    nf = QuantConfig.from_name("nf3-g64-s16-r0")
    assert cfg.storage_bits(64, 6400) - nf.storage_bits(64, 6400) == 3 * 64 * 100  # the zero points


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_storage_matches_quant_bits_for_every_int_config(shape, gen):
    rows, cols = shape
    W = torch.randn(rows, cols, generator=gen)
    for cfg in INT_CONFIGS:
        qt = quantize(W, cfg)
        slack = 8 * qt.nbytes - cfg.quant_bits(rows, cols)
        assert 0 <= slack < 8 * cfg.stored_arrays(), (cfg.name, shape, slack)
        assert len(qt.arrays()) == cfg.stored_arrays()
        assert "zeros" in qt.arrays()


@pytest.mark.parametrize("shape", [(3, 7), (130, 66), (9, 65)], ids=str)
def test_round_trip_through_arrays_and_fast_path_are_bit_identical(shape, gen):
    W = torch.randn(*shape, generator=gen) * 0.05 + 0.01
    for cfg in INT_CONFIGS[::7] + INT_CONFIGS[-12:]:
        qt = quantize(W, cfg)
        back = QuantizedTensor.from_arrays(qt.arrays(), shape=shape, dtype=W.dtype, config=cfg)
        out = back.dequantize()
        assert torch.equal(out, qt.dequantize()), cfg.name
        assert torch.equal(out, quantize_dequantize(W, cfg)), cfg.name
        assert torch.equal(W - out, quantize_residual(W, cfg)), cfg.name


def test_codes_and_zero_points_stay_in_range_and_decode_as_documented(gen):
    W = torch.randn(40, 96, generator=gen)
    for bits in (2, 3, 4, 8):
        cfg = QuantConfig(family="int", bits=bits, block=32, scale_bits=16)
        qt = quantize(W, cfg)
        zeros = qt.zero_points()
        assert zeros.shape == (40, 3)
        assert float(zeros.min()) >= 0 and float(zeros.max()) <= top_code(bits)
        step = qt.block_scales()
        # every value is an integer number of steps from zero, between the ends the zero point allows
        k = (qt.dequantize().view(40, 3, 32) / step.unsqueeze(-1))
        assert torch.allclose(k, k.round(), atol=1e-3)
        assert bool((k.round() >= -zeros.unsqueeze(-1)).all() and (k.round() <= top_code(bits) - zeros.unsqueeze(-1)).all())


def test_each_weight_is_within_half_a_step_with_fp32_steps():
    """Every weight of a block lies in its 0-widened [lo, hi]; with exact steps it is at most s/2 away."""
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(7))
    for bits in (2, 3, 4, 8):
        blocks = W.view(64, 2, 64)
        step, lo = block_step_lo(blocks, bits)
        err = (blocks - int_round(blocks, step, lo, bits)).abs()
        assert bool((err <= step.unsqueeze(-1) * 0.5 * (1 + 1e-5)).all()), bits


def test_zero_stays_exact_and_all_zero_blocks_decode_to_zero():
    W = torch.zeros(4, 64)
    W[0, :32] = torch.linspace(-1, 2, 32)
    W[1, 32:] = torch.linspace(0.5, 3, 32)  # an all-positive block: its range still includes 0
    for cfg in (QuantConfig(family="int", bits=3, block=32, scale_bits=16),
                QuantConfig(family="int", bits=4, block=32, scale_bits=3, scale_block=4)):
        out = quantize(W, cfg).dequantize()
        assert bool((out[W == 0] == 0).all()), cfg.name
        assert bool((out[2:] == 0).all())


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_error_on_gaussian_data_matches_uniform_noise(bits):
    """Round to nearest on a grid of step s leaves an error close to uniform on [-s/2, s/2]:
    mean square s^2/12 per weight (s each block's decoded step). Over 2^19 weights the sample
    mean of a uniform error's square has a relative standard deviation of sqrt(0.8 / 2^19) =
    0.12%; the uniform model itself is off by the curvature of the Gaussian density over a step
    and by the block ends (measured within 0.8% at 2 bits, 0.1% at 8): a 2% tolerance."""
    W = torch.randn(512, 1024, generator=torch.Generator().manual_seed(3))
    cfg = QuantConfig(family="int", bits=bits, block=64, scale_bits=16)
    qt = quantize(W, cfg)
    step = qt.block_scales()
    predicted = float((step.double() ** 2 / 12).mean())
    measured = float((W - qt.dequantize()).double().pow(2).mean())
    assert measured == pytest.approx(predicted, rel=0.02)


def test_int_beats_nf_at_3_bits_on_skewed_blocks(gen):
    """Blocks whose weights are not centred on 0 are where the zero point pays."""
    W = torch.randn(64, 256, generator=gen) * 0.1 + torch.linspace(-0.3, 0.3, 64).unsqueeze(1)
    err = {f: float((W - quantize(W, QuantConfig(family=f, bits=3, block=64, scale_bits=16)).dequantize())
                    .pow(2).sum()) for f in ("nf", "int")}
    assert err["int"] < err["nf"]


def test_nf_arrays_refuse_zero_points_and_int_arrays_need_them(gen):
    W = torch.randn(8, 64, generator=gen)
    nf = quantize(W, QuantConfig(bits=3, block=32, scale_bits=16))
    it = quantize(W, QuantConfig(family="int", bits=3, block=32, scale_bits=16))
    with pytest.raises(ValueError, match="do not belong"):
        QuantizedTensor.from_arrays({**nf.arrays(), "zeros": it.zeros}, (8, 64), W.dtype, nf.config)
    arrays = dict(it.arrays())
    del arrays["zeros"]
    with pytest.raises(ValueError, match="zeros"):
        QuantizedTensor.from_arrays(arrays, (8, 64), W.dtype, it.config)
