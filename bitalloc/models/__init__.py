"""Models: loading (built-in alias, .gguf, local directory, hub id), the device, target discovery,
calibration and evaluation text, calibration settings and the Fisher estimate (and its cache),
perplexity and KL divergence."""

from bitalloc.identity import BUILTIN_ALIAS
from bitalloc.models.builtin import BuiltinModelMissingError
from bitalloc.models.calibration import Calibration, calibration_fisher
from bitalloc.models.causal import is_causal_lm
from bitalloc.models.device import resolve_device
from bitalloc.models.evaluate import evaluate, evaluate_many, kl_divergence, perplexity, perplexity_and_kl, score_models
from bitalloc.models.hub import ModelNotFoundError
from bitalloc.models.loading import IncompleteCheckpointError, NonFiniteWeightsError, UnreadableCheckpointError, load_model
from bitalloc.models.targets import find_targets, model_summary, set_target_weight, target_shapes, target_weight
from bitalloc.models.text import TextSourceError, calibration_tokens, load_text, token_windows

__all__ = [
    "BUILTIN_ALIAS",
    "BuiltinModelMissingError",
    "Calibration",
    "ModelNotFoundError",
    "IncompleteCheckpointError",
    "NonFiniteWeightsError",
    "UnreadableCheckpointError",
    "TextSourceError",
    "calibration_fisher",
    "calibration_tokens",
    "evaluate",
    "evaluate_many",
    "find_targets",
    "is_causal_lm",
    "kl_divergence",
    "perplexity_and_kl",
    "score_models",
    "load_model",
    "load_text",
    "model_summary",
    "perplexity",
    "resolve_device",
    "set_target_weight",
    "target_shapes",
    "target_weight",
    "token_windows",
]
