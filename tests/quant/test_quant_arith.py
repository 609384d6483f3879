"""true_divide: correctly rounded division, the same on every device."""

import numpy as np
import pytest
import torch

from bitalloc.quant.arith import true_divide


@pytest.mark.parametrize("divisor", [3, 7, 15, 255, 65535])
def test_true_divide_is_correctly_rounded(divisor, gen):
    x = torch.cat([torch.arange(0, 256, dtype=torch.float32), torch.rand(10_000, generator=gen) * 1e3])
    want = x.numpy() / np.float32(divisor)  # IEEE float32 division
    assert np.array_equal(true_divide(x, divisor).numpy(), want)


def test_multiplying_by_the_reciprocal_differs():
    # what CUDA kernels do with a scalar divisor, and why true_divide passes a tensor
    codes = torch.arange(0, 256, dtype=torch.float32)
    reciprocal = torch.tensor(1.0 / 255, dtype=torch.float32)
    assert not torch.equal(codes * reciprocal, true_divide(codes, 255))


def test_true_divide_stays_on_the_device_and_dtype():
    x = torch.ones(4, dtype=torch.float16, device="meta")
    out = true_divide(x, 3)
    assert out.device.type == "meta" and out.dtype == torch.float16
