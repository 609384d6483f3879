import pytest
import torch

from bitalloc.quant import (
    AffineQuantized,
    BinaryQuantized,
    affine_storage_bits,
    binary_storage_bits,
    quantize_affine,
    quantize_binary,
)

SHAPES = [(1, 1), (3, 7), (128, 16), (16, 128), (130, 5), (5, 300), (200, 129)]
GROUPS = [1, 7, 32, 128]


def rel_error(x: torch.Tensor, xh: torch.Tensor) -> float:
    return ((x - xh).pow(2).sum() / x.pow(2).sum()).item()


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_affine_shapes_storage_and_round_trip(shape, dim, gen):
    x = torch.randn(*shape, generator=gen)
    for group in GROUPS:
        for bits in (1, 2, 3, 4, 8):
            q = quantize_affine(x, bits, group, dim)
            xh = q.dequantize()
            assert xh.shape == x.shape and xh.dtype == x.dtype
            slack = 8 * q.nbytes - affine_storage_bits(*shape, bits, group, dim)
            assert slack == 8 * q.nbytes - q.storage_bits()
            assert 0 <= slack < 8  # only the packed codes round up to a byte
            again = AffineQuantized.from_arrays(q.arrays(), shape, x.dtype, bits, group, dim)
            assert torch.equal(again.dequantize(), xh)


@pytest.mark.parametrize("dim", [0, 1])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_binary_shapes_storage_and_round_trip(shape, dim, gen):
    x = torch.randn(*shape, generator=gen)
    for group in GROUPS:
        q = quantize_binary(x, group, dim)
        xh = q.dequantize()
        assert xh.shape == x.shape and xh.dtype == x.dtype
        slack = 8 * q.nbytes - binary_storage_bits(*shape, group, dim)
        assert 0 <= slack < 8
        again = BinaryQuantized.from_arrays(q.arrays(), shape, x.dtype, group, dim)
        assert torch.equal(again.dequantize(), xh)


def test_storage_formula():
    # dim=1: 10 rows of 300 -> 3 groups of 128 per row, padded to 384
    assert affine_storage_bits(10, 300, 2, 128, dim=1) == 10 * 384 * 2 + 30 * 32
    # dim=0: 300 columns of 10 -> 1 group each, padded to 128
    assert affine_storage_bits(10, 300, 2, 128, dim=0) == 300 * 128 * 2 + 300 * 32
    assert binary_storage_bits(10, 300, 128, dim=1) == 10 * 384 + 30 * 16


@pytest.mark.parametrize("dim", [0, 1])
def test_affine_error_falls_with_bits(dim, gen):
    x = torch.randn(256, 64, generator=gen)
    errors = [rel_error(x, quantize_affine(x, b, 128, dim).dequantize()) for b in range(1, 9)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4
    binary = rel_error(x, quantize_binary(x, 128, dim).dequantize())
    assert binary < 0.5 and binary > errors[1]


def test_affine_exact_on_its_grid():
    x = torch.arange(32, dtype=torch.float32).view(2, 16) * 0.25 - 1.0  # rows: 16 steps of 0.25
    q = quantize_affine(x, 4, 16, dim=1)
    assert torch.equal(q.dequantize(), x)
    assert q.scales.tolist() == [0.25, 0.25]
    assert q.zeros.tolist() == [-1.0, 3.0]


def test_affine_group_ends_and_constant_groups(gen):
    x = torch.randn(4, 50, generator=gen)
    x[2] = 0.7  # a constant line: zero scale
    q = quantize_affine(x, 3, 25, dim=1)
    xh = q.dequantize()
    assert bool(torch.isfinite(xh).all())
    assert torch.equal(xh[2], torch.full((50,), 0.7).half().float())
    # the group minimum is reproduced to fp16 precision
    g = x.view(8, 25)
    assert torch.allclose(xh.view(8, 25).gather(1, g.argmin(1, keepdim=True)),
                          g.min(1, keepdim=True).values, rtol=1e-3, atol=0)


def test_groups_run_along_the_chosen_dim(gen):
    x = torch.randn(20, 6, generator=gen)
    down = quantize_affine(x, 2, 20, dim=0)  # one group per column
    assert torch.equal(down.zeros, x.min(dim=0).values.half())
    along = quantize_affine(x, 2, 6, dim=1)  # one group per row
    assert torch.equal(along.zeros, x.min(dim=1).values.half())
    b = quantize_binary(x, 20, dim=0)
    assert torch.equal(b.scales, x.abs().mean(dim=0).half())


@pytest.mark.parametrize("dim", [0, 1])
def test_binary_is_sign_times_group_mean(dim, gen):
    x = torch.randn(64, 48, generator=gen)
    x[3, 5] = 0.0  # zero decodes to +mean
    group = 16
    lines = x if dim == 1 else x.t()
    means = lines.reshape(-1, group).abs().mean(dim=1).half().float()
    signs = torch.where(lines >= 0, 1.0, -1.0).reshape(-1, group)
    expected = (signs * means.unsqueeze(1)).reshape(lines.shape)
    expected = expected if dim == 1 else expected.t()
    assert torch.equal(quantize_binary(x, group, dim).dequantize(), expected)


def test_binary_mean_ignores_padding():
    x = torch.tensor([[1.0, -3.0, 2.0]])
    q = quantize_binary(x, 2, dim=1)  # groups [1, -3] and [2, pad]
    assert q.dequantize().tolist() == [[2.0, -2.0, 2.0]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs(dtype, gen):
    x = torch.randn(8, 40, generator=gen).to(dtype)
    assert quantize_affine(x, 4, 16, 1).dequantize().dtype == dtype
    assert quantize_binary(x, 16, 0).dequantize().dtype == dtype


def test_bad_inputs_rejected(gen):
    x = torch.randn(4, 8, generator=gen)
    with pytest.raises(ValueError, match="bits"):
        quantize_affine(x, 0, 4)
    with pytest.raises(ValueError, match="bits"):
        quantize_affine(x, 9, 4)
    with pytest.raises(ValueError, match="group"):
        quantize_affine(x, 2, 0)
    with pytest.raises(ValueError, match="dim"):
        quantize_binary(x, 4, dim=2)
    with pytest.raises(ValueError, match="2-D"):
        quantize_binary(torch.randn(8), 4)
    x[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN/inf: 1 of 32"):
        quantize_affine(x, 2, 4)
    q = quantize_binary(torch.randn(4, 8, generator=gen), 4)
    with pytest.raises(ValueError, match="scales"):
        BinaryQuantized.from_arrays({**q.arrays(), "scales": q.scales[:-1]}, (4, 8), torch.float32, 4, 1)
