"""Target discovery: the weight matrices bitalloc quantizes, found by type, filtered by regex.

Targets are every ``torch.nn.Linear`` and every transformers ``Conv1D`` (GPT-2 style, weight
stored in x out), in module order. The output embedding (``model.get_output_embeddings()``,
matched by module identity, whatever its name) and the input embedding are left out unless an
explicit ``include`` pattern matches the output layer's name. No layer names are hard-coded.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from transformers.pytorch_utils import Conv1D

logger = logging.getLogger(__name__)

TARGET_TYPES: tuple[type, ...] = (torch.nn.Linear, Conv1D)
Patterns = str | Sequence[str] | None
_MAX_LISTED = 8


def _compile(patterns: Patterns, what: str) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = []
    for pattern in patterns:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"invalid {what} regex {pattern!r}: {err}") from err
    return compiled


def _matches(name: str, patterns: Iterable[re.Pattern[str]]) -> bool:
    return any(p.search(name) for p in patterns)


def _embedding_modules(model: torch.nn.Module) -> tuple[torch.nn.Module | None, torch.nn.Module | None]:
    def get(method: str) -> torch.nn.Module | None:
        getter = getattr(model, method, None)
        if getter is None:
            return None
        try:
            return getter()
        except (NotImplementedError, AttributeError):
            return None

    return get("get_input_embeddings"), get("get_output_embeddings")


def _listing(names: Sequence[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... ({len(names)} in all)" if len(names) > _MAX_LISTED else "")


def find_targets(
    model: torch.nn.Module, include: Patterns = None, exclude: Patterns = None
) -> list[tuple[str, torch.nn.Module]]:
    """The target layers of ``model`` as ``(name, module)`` pairs, in module order.

    ``include``/``exclude`` are regexes (or lists of regexes) tried with ``re.search`` on module
    names. Without ``include``, every Linear/Conv1D except the input and output embeddings is a
    target; with it, those whose name matches one of its patterns (the output layer too, when a
    pattern matches its name: note that ``.`` matches every name). ``exclude`` then removes
    matching names. Raises ValueError, listing names the model has, when nothing is left.
    """
    includes = _compile(include, "include")
    excludes = _compile(exclude, "exclude")
    input_embedding, output_embedding = _embedding_modules(model)
    embeddings = {id(m) for m in (input_embedding, output_embedding) if m is not None}

    # a layer without a weight matrix (bitalloc's QuantizedLinear keeps packed codes instead) is no target
    candidates = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, TARGET_TYPES) and isinstance(getattr(m, "weight", None), torch.Tensor)]
    if includes:
        selected = [(n, m) for n, m in candidates if _matches(n, includes)]
    else:
        selected = [(n, m) for n, m in candidates if id(m) not in embeddings]
    selected = [(n, m) for n, m in selected if not _matches(n, excludes)]

    if not selected:
        linear_names = [n for n, _ in candidates]
        module_names = [n for n, _ in model.named_modules() if n]
        raise ValueError(
            f"no target layers matched (include={include!r}, exclude={exclude!r}).\n"
            f"Linear/Conv1D layers in the model: {_listing(linear_names) or 'none'}\n"
            f"Other module names: {_listing(module_names)}\n"
            "Pass an --include regex that matches the layers to quantize, e.g. --include '"
            + (re.escape(linear_names[0].split(".")[-1]) if linear_names else "proj")
            + "'."
        )
    for name, module in selected:
        if output_embedding is not None and module is output_embedding and input_embedding is not None:
            if getattr(module, "weight", None) is getattr(input_embedding, "weight", object()):
                logger.warning("target %s shares its weight with the input embedding (tied)", name)
    return selected


def target_weight(module: torch.nn.Module) -> torch.Tensor:
    """The (out_features, in_features) weight matrix of a target (a transposed view for Conv1D)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, torch.nn.Linear):
        return module.weight
    raise TypeError(f"{type(module).__name__} is not a target type (Linear or Conv1D)")


def float_target_weight(name: str, module: torch.nn.Module, device: torch.device | str) -> torch.Tensor:
    """A target's (out, in) weight as float32 on ``device``; ValueError naming it when not finite."""
    W = target_weight(module).detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"matrix {name} contains {bad} NaN/inf values; fix the checkpoint or --exclude it")
    return W


def set_target_weight(module: torch.nn.Module, weight: torch.Tensor) -> None:
    """Write an (out_features, in_features) matrix into a target, in place, in its dtype and device."""
    current = target_weight(module)
    if tuple(weight.shape) != tuple(current.shape):
        raise ValueError(
            f"weight of shape {tuple(weight.shape)} does not fit {type(module).__name__} "
            f"of shape (out, in) = {tuple(current.shape)}"
        )
    with torch.no_grad():
        current.copy_(weight.to(device=current.device, dtype=current.dtype))


def target_shapes(targets: Iterable[tuple[str, torch.nn.Module]]) -> dict[str, tuple[int, int]]:
    """``name -> (rows, cols)`` of each target's (out, in) weight matrix."""
    return {name: tuple(target_weight(module).shape) for name, module in targets}


def model_summary(model: torch.nn.Module, include: Patterns = None, exclude: Patterns = None) -> dict[str, Any]:
    """What ``bitalloc info`` shows: targets with shapes and sizes, non-target and total parameters.

    Returns plain data: ``model`` (class name), ``targets`` (list of dicts with ``name``,
    ``type``, ``rows``, ``cols``, ``params``), ``n_targets``, ``target_params``,
    ``non_target_params`` (also as ``other_params``), ``total_params`` (shared tensors counted
    once) and ``non_target_tensors`` (name, shape, params of every other parameter tensor).
    """
    targets = find_targets(model, include=include, exclude=exclude)
    rows = []
    target_param_ids = set()
    for name, module in targets:
        out_features, in_features = target_weight(module).shape
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "rows": int(out_features),
                "cols": int(in_features),
                "params": int(out_features * in_features),
            }
        )
        target_param_ids.add(id(module.weight))
    target_params = sum(module.weight.numel() for module in {id(m.weight): m for _, m in targets}.values())
    others = [
        {"name": name, "shape": list(p.shape), "params": p.numel()}
        for name, p in model.named_parameters()
        if id(p) not in target_param_ids
    ]
    total = sum(p.numel() for p in model.parameters())
    return {
        "model": type(model).__name__,
        "targets": rows,
        "n_targets": len(rows),
        "target_params": int(target_params),
        "non_target_params": int(total - target_params),
        "other_params": int(total - target_params),
        "total_params": int(total),
        "non_target_tensors": others,
    }
