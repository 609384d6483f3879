"""Arithmetic that gives the same bits on every device.

PyTorch's CUDA kernels divide by a Python number (or a CPU scalar tensor) as a multiplication
by its reciprocal, which can differ from the division in the last bit; its CPU kernels divide.
Stored formats decode through :func:`true_divide`, so a matrix quantized on a GPU and one
quantized on the CPU choose the same codes against the same scales.
"""

from __future__ import annotations

import torch


def true_divide(x: torch.Tensor, divisor: float) -> torch.Tensor:
    """``x / divisor``, correctly rounded on every device (the divisor is a tensor on x's device).

    The divisor is taken in x's dtype, as PyTorch does with a Python number: callers pass
    float32 tensors and small integers, which are exact there.
    """
    return x / torch.tensor(divisor, dtype=x.dtype, device=x.device)
