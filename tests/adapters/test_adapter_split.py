import numpy as np
import pytest
import torch

from bitalloc.adapters import AdapterQuantConfig, AdapterSpace, config_errors, svd_split
from bitalloc.adapters.split import dequantized_factors, fake_affine, fake_binary, quantize_module
from bitalloc.quant import quantize_affine, quantize_binary


def _factors(n, rows, rank, cols, seed=0):
    gen = torch.Generator().manual_seed(seed)
    decay = 0.6 ** torch.arange(rank, dtype=torch.float32)
    a = torch.randn(n, rank, cols, generator=gen) * 0.1
    b = torch.randn(n, rows, rank, generator=gen) * 0.05 * decay
    return a, b


@pytest.mark.parametrize("shape", [(40, 8, 96), (96, 8, 40), (6, 8, 50), (64, 16, 64)])
def test_svd_split_preserves_delta(shape):
    rows, rank, cols = shape
    a, b = _factors(3, rows, rank, cols)
    scale = torch.tensor([2.0, 0.5, 1.0])
    f = svd_split(a, b, scale)
    dense = scale.double().view(-1, 1, 1) * (b.double() @ a.double())
    assert f.b.shape == (3, rows, rank) and f.a.shape == (3, rank, cols)
    assert torch.allclose(f.b @ f.a, dense, rtol=0, atol=1e-12 * dense.abs().max())
    # balanced factors: B'ᵀB' = A'A'ᵀ = diag(S), S the singular values of ΔW
    k = min(rows, cols, rank)
    gram_b = f.b.transpose(1, 2) @ f.b
    assert torch.allclose(gram_b, torch.diag_embed(f.s), atol=1e-12)
    assert torch.allclose(f.a @ f.a.transpose(1, 2), torch.diag_embed(f.s), atol=1e-12)
    assert torch.allclose(f.s[:, :k], torch.linalg.svdvals(dense)[:, :k], rtol=1e-10)


def test_svd_split_rank_deficient():
    a, b = _factors(1, 30, 6, 20)
    b[..., 3:] = 0  # rank 3 in a rank-6 adapter
    f = svd_split(a, b, 1.0)
    assert torch.allclose(f.b @ f.a, b.double() @ a.double(), atol=1e-14)
    assert float(f.s[0, 3:].abs().max()) < 1e-12


@pytest.mark.parametrize("length,group", [(96, 32), (100, 32), (40, 128), (7, 3)])
def test_fake_quant_matches_packed_quantizers(length, group):
    x = torch.randn(5, length, generator=torch.Generator().manual_seed(length))
    for bits in (2, 3, 4, 8):
        assert torch.equal(fake_affine(x, bits, group), quantize_affine(x, bits, group, dim=1).dequantize())
    assert torch.equal(fake_binary(x, group), quantize_binary(x, group, dim=1).dequantize())


def test_errors_match_dense_products():
    a, b = _factors(4, 40, 8, 96, seed=3)
    f = svd_split(a, b, 2.0)
    configs = AdapterSpace(groups=(16, 32), low_bits=(0, 1)).configs(8)
    errors = config_errors(f, configs)
    dense = f.b @ f.a
    for j, cfg in enumerate(configs):
        bh, ah = dequantized_factors(f, cfg)
        expect = ((dense - bh.double() @ ah.double()) ** 2).sum(dim=(1, 2)).numpy()
        np.testing.assert_allclose(errors[:, j], expect, rtol=1e-8, atol=1e-14)
    norm = (dense ** 2).sum(dim=(1, 2)).numpy()
    dropped = [j for j, c in enumerate(configs) if c.high == 0 and c.low_bits == 0]
    np.testing.assert_allclose(errors[:, dropped[0]], norm, rtol=1e-10)


def test_high_rank_eight_bits_is_near_lossless():
    a, b = _factors(4, 64, 8, 128, seed=4)
    f = svd_split(a, b, 2.0)
    configs = [AdapterQuantConfig(bits=8, high=8, group=32), AdapterQuantConfig(bits=2, high=0, group=32)]
    errors = config_errors(f, configs)
    norm = f.s.pow(2).sum(dim=1).numpy()
    assert np.all(errors[:, 0] / norm < 1e-4)
    assert np.all(errors[:, 1] / norm > 100 * errors[:, 0] / norm)


@pytest.mark.parametrize("shape", [(40, 8, 96), (576, 16, 192), (33, 4, 70)])
def test_storage_bits_equal_packed_bytes(shape):
    rows, rank, cols = shape
    a, b = _factors(1, rows, rank, cols, seed=5)
    f = svd_split(a, b, 1.0)
    for cfg in AdapterSpace(groups=(32, 128), low_bits=(0, 1)).configs(rank):
        parts = quantize_module(f.b[0], f.a[0], cfg)
        nbytes = sum(q.nbytes for q in parts.values())
        arrays = sum(len(q.arrays()) for q in parts.values())
        assert arrays == cfg.stored_arrays(rank)
        slack = 8 * nbytes - cfg.storage_bits(rows, cols, rank)
        assert 0 <= slack <= 7 * arrays, cfg.name
        # the packed arrays decode to the values the profile's errors are computed from
        bh, ah = dequantized_factors(f, cfg)
        h = cfg.high
        if h:
            assert torch.equal(parts["B.high"].dequantize(), bh[0, :, :h])
            assert torch.equal(parts["A.high"].dequantize(), ah[0, :h])
        if "B.low" in parts:
            assert torch.equal(parts["B.low"].dequantize(), bh[0, :, h:])
            assert torch.equal(parts["A.low"].dequantize(), ah[0, h:])


def test_weighted_errors_match_dense_traces():
    a, b = _factors(3, 24, 6, 40, seed=6)
    f = svd_split(a, b, 1.5)
    x = torch.randn(200, 40, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    h = x.T @ x / 200
    configs = AdapterSpace(groups=(16,), low_bits=(0, 1)).configs(6)
    weighted = config_errors(f, configs, weight=h)
    dense = f.b @ f.a
    for j, cfg in enumerate(configs):
        bh, ah = dequantized_factors(f, cfg)
        diff = dense - bh.double() @ ah.double()
        expect = torch.einsum("nij,jk,nik->n", diff, h, diff).numpy()
        np.testing.assert_allclose(weighted[:, j], expect, rtol=1e-8, atol=1e-14)
