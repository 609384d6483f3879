"""QuantizedLinear: forward equals the dequantized reference; dtype/device moves keep the packed arrays."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bitalloc.apply import QuantizedLinear
from bitalloc.configs import QuantConfig
from bitalloc.quant import quantize

CONFIGS = ["nf4-g16-s16-r0", "nf3-g32-s8x16-r0", "nf2-g64-s4x16-fp32-r0"]


def _layer(name: str, bias: bool = True, shape=(24, 40), seed: int = 0) -> tuple[QuantizedLinear, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(shape, generator=g)
    b = torch.randn(shape[0], generator=g) if bias else None
    q = quantize(W, QuantConfig.from_name(name))
    return QuantizedLinear(q, bias=b), b


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("bias", [True, False])
def test_forward_matches_dequantized_linear(name, bias):
    layer, b = _layer(name, bias)
    x = torch.randn(3, 5, 40)
    want = F.linear(x, layer.quantized().dequantize().float(), b)
    assert torch.allclose(layer(x), want, atol=1e-6)
    assert layer.weight is None and layer.in_features == 40 and layer.out_features == 24
    assert isinstance(layer, torch.nn.Linear)  # so PEFT wraps it with its LoRA Linear
    assert layer.qweight.dtype == torch.uint8


def test_dtype_moves_change_compute_dtype_not_stored_arrays():
    layer, _ = _layer("nf3-g32-s8x16-r0")
    stored = {n: b.clone() for n, b in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16
    assert layer.bias.dtype == torch.bfloat16
    for n, b in layer.named_buffers():
        assert b.dtype == stored[n].dtype and torch.equal(b, stored[n])
    x = torch.randn(2, 40, dtype=torch.bfloat16)
    assert layer(x).dtype == torch.bfloat16
    layer.float()
    assert layer.compute_dtype == torch.float32


def test_dtype_move_keeps_buffers_on_their_device():
    # the meta device stands in for a GPU: `.to(dtype)` after a device move must not bring the
    # codes back to the CPU (it did: the dtype probe was a CPU tensor)
    layer, _ = _layer("nf3-g32-s8x16-r0")
    layer.to("meta")
    layer.to(torch.float16)
    assert layer.compute_dtype == torch.float16
    assert {b.device.type for b in layer.buffers()} == {"meta"}
    assert layer.bias.device.type == "meta" and layer.bias.dtype == torch.float16


def test_state_dict_round_trip():
    layer, _ = _layer("nf4-g16-s16-r0")
    state = layer.state_dict()
    assert set(state) == {"qweight", "scales", "bias"}
    other, _ = _layer("nf4-g16-s16-r0", seed=1)
    other.load_state_dict(state)
    x = torch.randn(4, 40)
    assert torch.equal(other(x), layer(x))


def test_from_arrays_checks_sizes():
    layer, _ = _layer("nf4-g16-s16-r0")
    arrays = layer.quantized().arrays()
    arrays["codes"] = arrays["codes"][:-1]
    with pytest.raises(ValueError, match="codes"):
        QuantizedLinear.from_arrays(arrays, (24, 40), QuantConfig.from_name("nf4-g16-s16-r0"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_forward_matches_cpu():
    layer, b = _layer("nf3-g32-s8x16-r0", shape=(256, 512))
    x = torch.randn(8, 512)
    want = layer(x)
    layer.to("cuda")
    assert layer.qweight.device.type == "cuda" and layer.qweight.dtype == torch.uint8
    got = layer(x.cuda()).cpu()
    assert torch.allclose(got, want, atol=1e-4)
    layer.to(torch.float16)
    assert layer(x.cuda().half()).dtype == torch.float16


def test_weight_cache_is_opt_in_and_invalidated():
    layer, _ = _layer("nf4-g16-s16-r0")
    x = torch.randn(2, 40)
    layer(x)
    assert layer._cached_weight is None
    layer.cache_weight = True
    first = layer(x)
    assert layer._cached_weight is not None
    assert torch.equal(layer(x), first)
    other, _ = _layer("nf4-g16-s16-r0", seed=5)
    layer.load_state_dict(other.state_dict())  # new codes: the cache must not survive
    assert torch.allclose(layer(x), other(x), atol=1e-6)
    layer.to(torch.float64)
    assert layer._cached_weight is None or layer._cached_weight.dtype == torch.float64
