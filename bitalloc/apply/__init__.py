"""Applying an allocation: the quantized model directory, its loader and ``QuantizedLinear``."""

from bitalloc.apply.layout import AppliedModelError, is_applied_dir, read_info
from bitalloc.apply.loader import load, load_applied
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.apply.writer import apply_allocation

__all__ = ["AppliedModelError", "QuantizedLinear", "apply_allocation", "is_applied_dir", "load", "load_applied",
           "read_info"]
