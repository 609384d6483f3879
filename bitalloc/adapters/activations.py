"""The base model's side of adapter profiling: does an adapter fit it, and its input second moments.

``H = E[x xᵀ]`` over every calibration token of the inputs ``x`` of each adapted linear layer
(the base model's own inputs, without any adapter) weights the activation-aware error
``tr(ΔE H ΔEᵀ)`` of a module, ``ΔE = ΔW − ΔŴ``: what the adapter's output loses on that text.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from bitalloc.adapters.peft_io import AdapterError, LoraAdapter

log = logging.getLogger(__name__)


def check_fit(adapters: Sequence[LoraAdapter], model: torch.nn.Module, model_name: str) -> None:
    """Raise :class:`AdapterError` unless every adapted module is a linear layer of ``model`` of the right shape."""
    modules = dict(model.named_modules())
    for adapter in adapters:
        for m in adapter.modules:
            layer = modules.get(m.name)
            if layer is None:
                raise AdapterError(
                    f"adapter {adapter.name!r} does not fit model {model_name!r}: it has no layer {m.name!r} "
                    f"(the adapter was made for {adapter.base_model!r})"
                )
            weight = getattr(layer, "weight", None)
            if not isinstance(layer, torch.nn.Linear) or weight is None or tuple(weight.shape) != (m.rows, m.cols):
                got = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(layer).__name__
                raise AdapterError(
                    f"adapter {adapter.name!r} does not fit model {model_name!r}: layer {m.name!r} is {got}, "
                    f"the adapter's ΔW is {(m.rows, m.cols)} (the adapter was made for {adapter.base_model!r})"
                )


@torch.no_grad()
def input_moments(model: torch.nn.Module, tokens: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """``E[x xᵀ]`` (float64, cols x cols) of the inputs of the named linear layers over all tokens."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []

    def hook(name: str):
        def record(_module: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].reshape(-1, inputs[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    for name in sorted(set(names)):
        hooks.append(modules[name].register_forward_pre_hook(hook(name)))
    try:
        device = next(model.parameters()).device
        for row in tokens:
            model(row.unsqueeze(0).to(device))
    finally:
        for h in hooks:
            h.remove()
    missing = sorted(set(names) - set(sums))
    if missing:
        raise AdapterError(f"the model's forward pass never reached layers {missing[:3]}")
    return {name: (sums[name] / counts[name]).cpu() for name in sums}
