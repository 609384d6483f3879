"""The same code on a CUDA device: results stay on the device and agree with the CPU."""

import pytest
import torch

from bitalloc.configs import QuantConfig
from bitalloc.quant import pack_bits, quantize, quantize_affine, quantize_binary, unpack_bits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("width", range(1, 9))
def test_packing_on_cuda(width, gen):
    codes = torch.randint(0, 2**width, (1001,), generator=gen).to(torch.uint8)
    packed = pack_bits(codes.cuda(), width)
    assert packed.is_cuda
    assert torch.equal(packed.cpu(), pack_bits(codes, width))
    assert torch.equal(unpack_bits(packed, width, 1001).cpu(), codes)


@pytest.mark.parametrize("cfg", [
    QuantConfig(bits=4, block=64, scale_bits=16),
    QuantConfig(bits=3, block=32, scale_bits=8, scale_block=256),
    QuantConfig(bits=2, block=16, scale_bits=3, scale_block=64, scale_dtype="fp32"),
    QuantConfig(bits=8, block=64, scale_bits=4, scale_block=16),
], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_on_cuda_matches_cpu(cfg, dtype, gen):
    W = torch.randn(300, 257, generator=gen).to(dtype)
    W[W.abs() < 0.3] = 0
    cpu = quantize(W, cfg)
    gpu = quantize(W.cuda(), cfg)
    assert gpu.device.type == "cuda" and gpu.nbytes == cpu.nbytes
    out = gpu.dequantize()
    assert out.is_cuda and out.dtype == dtype
    assert bool((out[W.cuda() == 0] == 0).all())
    ref = cpu.dequantize()
    mismatched = (out.cpu() != ref).float().mean().item()
    assert mismatched < 1e-3  # ties at midpoints may round differently, nothing else
    assert torch.allclose(gpu.to("cpu").dequantize(), out.cpu())


def test_quantize_large_matrix_on_cuda():
    g = torch.Generator(device="cuda").manual_seed(0)
    W = torch.randn(8192, 4096, generator=g, device="cuda", dtype=torch.bfloat16)
    qt = quantize(W, QuantConfig(bits=4, block=64, scale_bits=8, scale_block=256))
    err = ((W.float() - qt.dequantize().float()).pow(2).sum() / W.float().pow(2).sum()).item()
    assert 0.0081 < err < 0.0089


def test_affine_and_binary_on_cuda(gen):
    x = torch.randn(64, 200, generator=gen)
    for dim in (0, 1):
        a = quantize_affine(x.cuda(), 3, 128, dim)
        assert a.codes.is_cuda and a.dequantize().is_cuda
        assert torch.allclose(a.dequantize().cpu(), quantize_affine(x, 3, 128, dim).dequantize())
        b = quantize_binary(x.cuda(), 128, dim)
        assert torch.equal(b.dequantize().cpu(), quantize_binary(x, 128, dim).dequantize())
