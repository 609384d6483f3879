"""Applying an allocation: the quantized model directory, its loader and ``QuantizedLinear``;
evaluating a model or an applied directory."""

from bitalloc.apply.evaluation import evaluate_model, evaluate_models, evaluation_labels, model_info
from bitalloc.apply.layout import AppliedModelError, applied_summary, is_applied_dir, read_info
from bitalloc.apply.loader import load, load_applied, load_model_or_applied
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.apply.writer import apply_allocation

__all__ = ["AppliedModelError", "QuantizedLinear", "applied_summary", "apply_allocation", "evaluate_model", "evaluate_models", "evaluation_labels",
           "is_applied_dir", "load", "load_applied", "load_model_or_applied", "model_info", "read_info"]
