"""bitalloc: mixed-precision bit allocation for LLM quantization.

The public API is re-exported here lazily, so that light parts (``bitalloc.solvers``,
``bitalloc.configs``) can be imported without pulling in torch.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "QuantConfig": "bitalloc.configs",
    "config_space": "bitalloc.configs",
    "quantize": "bitalloc.quant",
    "QuantizedTensor": "bitalloc.quant",
    "load_model": "bitalloc.models",
    "find_targets": "bitalloc.models",
    "decompose": "bitalloc.lowrank",
    "Decomposition": "bitalloc.lowrank",
    "LoopPolicy": "bitalloc.lowrank",
    "load_profile": "bitalloc.profiles",
    "profile": "bitalloc.profiles",
    "ProfileRequest": "bitalloc.profiles",
    "merge_profiles": "bitalloc.profiles",
    "solve": "bitalloc.allocation",
    "sweep": "bitalloc.allocation",
    "Allocation": "bitalloc.allocation",
    "SolveOptions": "bitalloc.allocation",
    "refine": "bitalloc.allocation",
    "RefineOptions": "bitalloc.allocation",
    "report": "bitalloc.reports",
    "apply_allocation": "bitalloc.apply",
    "load": "bitalloc.apply",
    "evaluate_model": "bitalloc.apply",
    "evaluate_models": "bitalloc.apply",
    "QuantizedLinear": "bitalloc.apply",
    "AdapterQuantConfig": "bitalloc.adapters",
    "profile_adapters": "bitalloc.adapters",
    "solve_adapters": "bitalloc.adapters",
    "apply_adapters": "bitalloc.adapters",
    "load_adapter": "bitalloc.adapters",
    "BitallocError": "bitalloc.errors",
    "InputError": "bitalloc.errors",
    "IntegrityError": "bitalloc.errors",
    "OutputBusyError": "bitalloc.errors",
    "OutputExistsError": "bitalloc.errors",
    "UnavailableError": "bitalloc.errors",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'bitalloc' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
