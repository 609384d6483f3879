import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.configs import QuantConfig, config_space
from bitalloc.quant import QuantizedTensor, quantize

SHAPES = [
    (1, 1), (3, 7), (17, 33), (64, 64), (5, 300), (130, 66),
    (1, 1000), (257, 129), (2, 17), (9, 65), (33, 1), (1, 15),
]
LQLORA = config_space("lqlora", ranks=(0,))


def rel_error(W: torch.Tensor, cfg: QuantConfig) -> float:
    Wh = quantize(W, cfg).dequantize().to(torch.float32)
    W = W.to(torch.float32)
    return ((W - Wh).pow(2).sum() / W.pow(2).sum()).item()


# ----- exact accounting ------------------------------------------------------------------
def test_lqlora_space_has_288_configs():
    assert len(LQLORA) == 288


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_storage_matches_quant_bits_for_every_lqlora_config(shape, gen):
    rows, cols = shape
    W = torch.randn(rows, cols, generator=gen)
    for cfg in LQLORA:
        qt = quantize(W, cfg)
        slack = 8 * qt.nbytes - cfg.quant_bits(rows, cols)
        assert 0 <= slack < 8 * cfg.stored_arrays(), (cfg.name, shape, slack)
        assert len(qt.arrays()) == cfg.stored_arrays()


@pytest.mark.parametrize("shape", [(3, 7), (130, 66), (1, 1000)], ids=str)
def test_storage_matches_quant_bits_for_default_space(shape, gen):
    W = torch.randn(*shape, generator=gen)
    for cfg in config_space("default", ranks=(0, 64)):
        qt = quantize(W, cfg)
        slack = 8 * qt.nbytes - cfg.quant_bits(*shape)
        assert 0 <= slack < 8 * cfg.stored_arrays(), (cfg.name, shape, slack)


def test_rank_and_lowrank_bits_are_ignored(gen):
    W = torch.randn(17, 33, generator=gen)
    base = quantize(W, QuantConfig(bits=3, block=32, scale_bits=4, scale_block=16))
    other = quantize(W, QuantConfig(bits=3, block=32, scale_bits=4, scale_block=16, rank=8, lowrank_bits=8))
    assert base.nbytes == other.nbytes
    assert torch.equal(base.dequantize(), other.dequantize())


def test_stored_arrays_layout(gen):
    W = torch.randn(10, 100, generator=gen)
    fp16 = quantize(W, QuantConfig(bits=4, block=64, scale_bits=16)).arrays()
    assert {k: v.dtype for k, v in fp16.items()} == {"codes": torch.uint8, "scales": torch.float16}
    assert fp16["scales"].numel() == 20 and fp16["codes"].numel() == 10 * 128 * 4 // 8
    dq = quantize(W, QuantConfig(bits=3, block=16, scale_bits=3, scale_block=16, scale_dtype="fp32")).arrays()
    assert {k: v.dtype for k, v in dq.items()} == {
        "codes": torch.uint8, "scale_codes": torch.uint8, "scale2": torch.float32, "offset": torch.float32,
    }
    n_blocks = 10 * 7
    assert dq["scale_codes"].numel() == -(-n_blocks * 3 // 8)
    assert dq["scale2"].numel() == -(-n_blocks // 16)
    assert dq["offset"].numel() == 1


# ----- round trips -----------------------------------------------------------------------
def test_from_arrays_round_trip_every_config(gen):
    W = torch.randn(17, 33, generator=gen)
    for cfg in LQLORA:
        qt = quantize(W, cfg)
        again = QuantizedTensor.from_arrays(
            {k: v.clone() for k, v in qt.arrays().items()}, qt.shape, "float32", cfg
        )
        assert torch.equal(again.dequantize(), qt.dequantize()), cfg.name
        assert again.nbytes == qt.nbytes


def test_from_arrays_rejects_inconsistent_arrays(gen):
    cfg = QuantConfig(bits=4, block=64, scale_bits=8, scale_block=64)
    qt = quantize(torch.randn(8, 64, generator=gen), cfg)
    arrays = qt.arrays()
    with pytest.raises(ValueError, match="scale2"):
        QuantizedTensor.from_arrays({**arrays, "scale2": arrays["scale2"].float()}, qt.shape, qt.dtype, cfg)
    with pytest.raises(ValueError, match="codes"):
        QuantizedTensor.from_arrays({**arrays, "codes": arrays["codes"][:-1]}, qt.shape, qt.dtype, cfg)
    with pytest.raises(ValueError, match="offset"):
        QuantizedTensor.from_arrays({k: v for k, v in arrays.items() if k != "offset"}, qt.shape, qt.dtype, cfg)
    with pytest.raises(ValueError, match="unknown arrays"):
        QuantizedTensor.from_arrays({**arrays, "junk": arrays["offset"]}, qt.shape, qt.dtype, cfg)
    with pytest.raises(ValueError, match="do not belong"):
        QuantizedTensor.from_arrays({**arrays, "scales": arrays["scale2"]}, qt.shape, qt.dtype, cfg)


def test_slabs_give_the_same_result(monkeypatch, gen):
    import bitalloc.quant.blockwise as blockwise

    W = torch.randn(83, 70, generator=gen)
    for cfg in [QuantConfig(bits=3, block=32, scale_bits=16), QuantConfig(bits=2, block=16, scale_bits=3, scale_block=16)]:
        whole = quantize(W, cfg)
        monkeypatch.setattr(blockwise, "_SLAB_ELEMENTS", 100)  # 8-row slabs
        sliced = quantize(W, cfg)
        assert all(torch.equal(whole.arrays()[k], sliced.arrays()[k]) for k in whole.arrays())
        assert torch.equal(sliced.dequantize(), whole.dequantize())
        monkeypatch.undo()


def test_to_device_keeps_everything(gen):
    qt = quantize(torch.randn(5, 9, generator=gen), QuantConfig())
    moved = qt.to("cpu")
    assert moved.device == torch.device("cpu")
    assert torch.equal(moved.dequantize(), qt.dequantize())


# ----- dtypes and bad input --------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_dequantize_returns_input_dtype_and_shape(dtype, gen):
    W = torch.randn(7, 45, generator=gen).to(dtype)
    out = quantize(W, QuantConfig(bits=4, block=16, scale_bits=8, scale_block=16)).dequantize()
    assert out.dtype == dtype and out.shape == W.shape
    assert rel_error(W, QuantConfig(bits=4, block=16, scale_bits=8, scale_block=16)) < 0.02


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_rejected(bad, gen):
    W = torch.randn(4, 8, generator=gen)
    W[1, 2] = bad
    W[3, 3] = bad
    with pytest.raises(ValueError, match=r"NaN/inf: 2 of 32"):
        quantize(W, QuantConfig())


@pytest.mark.parametrize("W", [torch.randn(8), torch.randn(2, 3, 4), torch.zeros(0, 5), torch.ones(3, 3, dtype=torch.int32)],
                         ids=["1d", "3d", "empty", "int"])
def test_bad_matrices_rejected(W):
    with pytest.raises(ValueError, match="quantize expects"):
        quantize(W, QuantConfig())


# ----- exact values ----------------------------------------------------------------------
@pytest.mark.parametrize("cfg", [
    QuantConfig(bits=2, block=16, scale_bits=16),
    QuantConfig(bits=3, block=64, scale_bits=2, scale_block=16),
    QuantConfig(bits=4, block=32, scale_bits=8, scale_block=256, scale_dtype="fp32"),
    QuantConfig(bits=8, block=64, scale_bits=4, scale_block=64),
], ids=str)
def test_exact_zeros_stay_zero(cfg, gen):
    W = torch.randn(37, 150, generator=gen)
    W[torch.rand(W.shape, generator=gen) < 0.6] = 0.0
    W[5] = 0.0  # whole zero blocks: zero scales
    W[7, :64] = 1e-30  # tiny scale next to zero scales
    Wh = quantize(W, cfg).dequantize()
    assert bool(torch.isfinite(Wh).all())
    assert bool((Wh[W == 0] == 0).all())
    zeros = torch.zeros(9, 70)
    assert torch.equal(quantize(zeros, cfg).dequantize(), zeros)


def test_fp16_scales_are_rounded_absmax(gen):
    W = torch.randn(6, 40, generator=gen)
    qt = quantize(W, QuantConfig(bits=4, block=16, scale_bits=16))
    padded = torch.nn.functional.pad(W, (0, 8)).view(6, 3, 16)
    assert torch.equal(qt.block_scales(), padded.abs().amax(-1).half().float())
    # the block maximum is a code end: it comes back to fp16 precision
    Wh = qt.dequantize()
    idx = W.abs().argmax()
    assert abs(Wh.view(-1)[idx] - W.view(-1)[idx]) <= 1e-3 * abs(W.view(-1)[idx])


@pytest.mark.parametrize("scale_bits", [2, 3, 4, 8])
def test_double_quantized_scales_within_half_a_step(scale_bits, gen):
    W = torch.randn(40, 64, generator=gen) * torch.rand(40, 1, generator=gen)
    cfg = QuantConfig(bits=4, block=16, scale_bits=scale_bits, scale_block=16, scale_dtype="fp32")
    qt = quantize(W, cfg)
    s = W.view(-1, 16).abs().amax(-1)
    g = (s - s.min()).view(-1, 16).amax(-1)
    step = g.repeat_interleave(16) / (2**scale_bits - 1)
    assert bool(((qt.block_scales().view(-1) - s).abs() <= step / 2 + 1e-6).all())
    assert qt.offset.item() == s.min().item()


def test_huge_values_saturate_fp16_scales(caplog):
    W = torch.tensor([[1e6, -3.0, 0.5, 0.0]])
    with caplog.at_level(logging.WARNING, logger="bitalloc.quant.scales"):
        Wh = quantize(W, QuantConfig(bits=4, block=4, scale_bits=16)).dequantize()
    assert "saturating" in caplog.text
    assert bool(torch.isfinite(Wh).all()) and Wh[0, 3] == 0
    Wh = quantize(W, QuantConfig(bits=4, block=4, scale_bits=8, scale_block=16, scale_dtype="fp32")).dequantize()
    assert abs(Wh[0, 0].item() - 1e6) < 1.0


# ----- quality ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return torch.randn(256, 1024, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("block", [16, 64])
@pytest.mark.parametrize("scales", [dict(scale_bits=16), dict(scale_bits=8, scale_block=256),
                                    dict(scale_bits=3, scale_block=64, scale_dtype="fp32")], ids=str)
def test_error_falls_as_bits_rise(gaussian, block, scales):
    errors = [rel_error(gaussian, QuantConfig(bits=b, block=block, **scales)) for b in (2, 3, 4, 8)]
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4, errors


def test_nf4_block64_fp16_error_on_gaussian(gaussian):
    """NF4, block 64, fp16 scales on N(0, 1): measured 0.00846 (NF2 0.318, NF3 0.0390, NF8 2.0e-4).

    For reference, the best fixed 16-level quantizer of N(0, 1) (Lloyd-Max) has relative
    MSE 0.00950; per-block absmax scaling adapts to each block and does ~11% better. The
    window is +-4% around the measured value (sampling noise on 262k weights is ~0.5%).
    """
    err = rel_error(gaussian, QuantConfig(bits=4, block=64, scale_bits=16))
    assert 0.0081 < err < 0.0088, err


def test_more_blocks_help(gaussian):
    errors = [rel_error(gaussian, QuantConfig(bits=3, block=b, scale_bits=16)) for b in (16, 32, 64)]
    assert errors[0] < errors[1] < errors[2], errors


def test_double_quantization_cost(gaussian):
    fp16 = rel_error(gaussian, QuantConfig(bits=4, block=64, scale_bits=16))
    s8 = rel_error(gaussian, QuantConfig(bits=4, block=64, scale_bits=8, scale_block=256))
    s2 = rel_error(gaussian, QuantConfig(bits=4, block=64, scale_bits=2, scale_block=256))
    assert abs(s8 - fp16) < 0.01 * fp16, (s8, fp16)
    assert s2 > 1.05 * s8, (s2, s8)


# ----- properties over the whole config grammar ------------------------------------------
configs = st.builds(
    QuantConfig,
    bits=st.sampled_from([2, 3, 4, 8]),
    block=st.sampled_from([1, 3, 5, 16, 32, 64, 128]),
    scale_bits=st.sampled_from([2, 3, 4, 5, 6, 7, 8, 16]),
    scale_block=st.sampled_from([1, 3, 16, 64, 256]),
    scale_dtype=st.sampled_from(["fp16", "fp32"]),
)


@settings(max_examples=150, deadline=None)
@given(cfg=configs, rows=st.integers(1, 40), cols=st.integers(1, 200), seed=st.integers(0, 2**31))
def test_accounting_and_zeros_property(cfg, rows, cols, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g) * 10 ** torch.empty(rows, 1).uniform_(-3, 3, generator=g)
    W[torch.rand(rows, cols, generator=g) < 0.3] = 0.0
    qt = quantize(W, cfg)
    slack = 8 * qt.nbytes - cfg.quant_bits(rows, cols)
    assert 0 <= slack < 8 * cfg.stored_arrays()
    Wh = qt.dequantize()
    assert bool(torch.isfinite(Wh).all())
    assert bool((Wh[W == 0] == 0).all())
    again = QuantizedTensor.from_arrays(qt.arrays(), (rows, cols), torch.float32, cfg)
    assert torch.equal(again.dequantize(), Wh)
