"""LoRAQuant adapters: profile, solve and apply many LoRA adapters under one bit budget.

``ΔW = s·B·A`` of each module is re-parameterized by SVD (``B' = U·S^½``, ``A' = S^½·Vᵀ``), the
top-h components quantized with b-bit affine RTN per group and the rest with 1-bit
sign·mean|w| (:class:`AdapterQuantConfig`); the profile holds the exact error and storage of
every config, the solvers pick one config per module under one budget for all adapters, and
``apply`` writes packed adapters that :func:`load_adapter` turns back into PEFT LoRA adapters.
"""

from bitalloc.adapters.apply import DequantizedAdapter, apply_adapters, load_adapter
from bitalloc.adapters.config import (
    PAPER_VARIANTS,
    AdapterQuantConfig,
    AdapterSpace,
    Variant,
    adapter_space,
    high_for_rho,
    lora_params,
)
from bitalloc.adapters.peft_io import AdapterError, LoraAdapter, LoraModule, read_adapter, read_adapters
from bitalloc.adapters.profile import AdapterProfile, AdapterProfileError, load_adapter_profile, profile_adapters, profile_batch
from bitalloc.adapters.solve import AdapterAllocation, fleet_min_budget, solve_adapters, solve_arrays
from bitalloc.adapters.split import SplitFactors, config_errors, svd_split

__all__ = [
    "PAPER_VARIANTS",
    "AdapterAllocation",
    "AdapterError",
    "AdapterProfile",
    "AdapterProfileError",
    "AdapterQuantConfig",
    "AdapterSpace",
    "DequantizedAdapter",
    "LoraAdapter",
    "LoraModule",
    "SplitFactors",
    "Variant",
    "adapter_space",
    "apply_adapters",
    "config_errors",
    "fleet_min_budget",
    "high_for_rho",
    "load_adapter",
    "load_adapter_profile",
    "lora_params",
    "profile_adapters",
    "profile_batch",
    "read_adapter",
    "read_adapters",
    "solve_adapters",
    "solve_arrays",
    "svd_split",
]
