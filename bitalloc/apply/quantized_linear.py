"""``QuantizedLinear``: a linear layer that keeps ``Q`` packed and dequantizes it in forward.

It subclasses ``torch.nn.Linear`` (so PEFT wraps it with its ordinary LoRA ``Linear``) but has
no ``weight`` parameter: the packed codes (NF or integer, as its config's family says) are the
buffer ``qweight`` (the name PEFT and GPTQ tools look for to find the layer's device), the
block scales are buffers named as :meth:`bitalloc.quant.QuantizedTensor.arrays` names them,
and an integer config's packed zero points are ``qzeros``. ``compute_dtype`` is the dtype
``forward`` dequantizes to (PEFT reads it to cast the adapter). The weight is always held as
(out_features, in_features), whatever layer type it replaced (``Linear`` or GPT-2's ``Conv1D``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bitalloc.apply.layout import BUFFER_TO_ARRAY
from bitalloc.configs import QuantConfig
from bitalloc.quant import QuantizedTensor

__all__ = ["QuantizedLinear"]

_BUFFERS = BUFFER_TO_ARRAY


class QuantizedLinear(torch.nn.Linear):
    """``y = x @ dequantize(Q).T + bias`` with ``Q`` stored packed (see the module docstring)."""

    def __init__(self, quantized: QuantizedTensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = quantized.shape
        self.config: QuantConfig = quantized.config
        self.compute_dtype = compute_dtype
        #: keep the dequantized weight after the first forward (faster inference, the memory of a
        #: dense layer); off by default, `bitalloc eval` turns it on
        self.cache_weight = False
        self._cached_weight: torch.Tensor | None = None
        self.register_parameter("weight", None)
        for buffer, array in _BUFFERS.items():
            value = quantized.arrays().get(array)
            if value is not None:
                self.register_buffer(buffer, value)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = torch.nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], shape: tuple[int, int], config: QuantConfig,
                    bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float32) -> "QuantizedLinear":
        """Build from the stored arrays of a :class:`QuantizedTensor` (sizes are checked)."""
        q = QuantizedTensor.from_arrays(arrays, shape=shape, dtype=compute_dtype, config=config)
        return cls(q, bias=bias, compute_dtype=compute_dtype)

    def quantized(self) -> QuantizedTensor:
        """The packed weight as a :class:`QuantizedTensor` (sharing this layer's buffers)."""
        arrays = {array: getattr(self, buffer) for buffer, array in _BUFFERS.items()
                  if getattr(self, buffer, None) is not None}
        return QuantizedTensor.from_arrays(arrays, shape=(self.out_features, self.in_features),
                                           dtype=self.compute_dtype, config=self.config)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``Q`` as a dense (out_features, in_features) tensor on this layer's device."""
        dtype = dtype or self.compute_dtype
        cached = self._cached_weight
        if cached is not None and cached.dtype == dtype and cached.device == self.qweight.device:
            return cached
        weight = self.quantized().dequantize().to(dtype)
        self._cached_weight = weight if self.cache_weight else None
        return weight

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._cached_weight = None
        super()._load_from_state_dict(*args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype if x.is_floating_point() else None)
        bias = None if self.bias is None else self.bias.to(weight.dtype)
        return F.linear(x.to(weight.dtype), weight, bias)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantizedLinear":
        # ``model.to(dtype)``/``.half()`` must not cast the packed codes or the scales: buffers
        # only follow device moves, and a float dtype asked for becomes the compute dtype.
        # the probe sits where the buffers are: ``.to(dtype)`` alone must leave them there
        probe = fn(torch.zeros((), dtype=self.compute_dtype, device=self.qweight.device))
        self._cached_weight = None
        buffers = dict(self._buffers)
        self._buffers.clear()
        try:
            super()._apply(fn, recurse)
        finally:
            for name, buf in buffers.items():
                self._buffers[name] = None if buf is None else buf.to(device=probe.device)
        if probe.is_floating_point():
            self.compute_dtype = probe.dtype
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, config={self.config.name}, compute_dtype={self.compute_dtype}")
