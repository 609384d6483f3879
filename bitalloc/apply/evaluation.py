"""Evaluating a model or an applied directory: what ``bitalloc eval`` and ``bitalloc info`` do.

An applied directory is evaluated as ``Q + L1 L2``. Its KL divergence is taken to the
original model it was made from (unless another reference is named or KL is switched off),
and ``self:N`` text is sampled from that original model, so that every quantized variant of
a model is scored on the same tokens (the samples are cached, see
:mod:`bitalloc.models.self_text`). A result can be appended as one JSON line to an evals
file, the file ``bitalloc report --evals`` reads.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from bitalloc.apply.layout import is_applied_dir, read_info
from bitalloc.apply.loader import load_model_or_applied
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.apply.summary import parameter_counts
from bitalloc.identity import model_id
from bitalloc.models import evaluate, find_targets, model_summary
from bitalloc.models.text import is_self_source
from bitalloc.preflight import check_appendable, check_model_spec, check_text_source

__all__ = ["evaluate_model", "evaluation_labels", "model_info"]


def evaluation_labels(spec: str | os.PathLike[str] | None) -> dict[str, Any]:
    """What an evals line says about the model ``spec`` (an applied directory or a plain model).

    Keys: ``label``, ``kind`` (``original``, ``uniform`` or ``bitalloc``), ``baseline``,
    ``bits_per_param``, ``budget``, ``objective``, ``source_model`` (the model an applied
    directory was made from; None for a plain model) and, for an applied directory, ``config``.
    """
    if spec is None or not is_applied_dir(spec):
        return {"label": model_id(spec), "kind": "original", "baseline": True, "bits_per_param": None,
                "budget": None, "objective": None, "source_model": None}
    info = read_info(spec)
    header = info.get("allocation") or {}
    uniform = header.get("uniform")
    return {
        "label": os.path.basename(os.path.normpath(spec)),
        "kind": "uniform" if uniform else "bitalloc",
        "baseline": bool(uniform),
        "bits_per_param": info["bits_per_param"],
        "budget": header.get("budget"),
        "objective": None if uniform else header.get("objective_column"),
        "config": uniform,
        "source_model": info.get("model"),
    }


def evaluate_model(
    spec: str | os.PathLike[str] | None,
    *,
    data: str = "wikitext2",
    seqlen: int = 2048,
    windows: int | None = None,
    kl_to: str | None = None,
    kl: bool = True,
    label: str | None = None,
    append: str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    verify: bool = True,
) -> dict[str, Any]:
    """Perplexity (GPTQ convention) and KL divergence of a model or an applied directory.

    ``kl_to`` names the KL reference (a model or an applied directory); unset, an applied
    directory's reference is its original model and a plain model has none; ``kl=False``
    switches KL off. ``data`` is a text source or ``self:N`` (for an applied directory
    sampled from its original model); it is checked before any model loads (see
    :func:`bitalloc.preflight.check_text_source`). ``append`` adds the result as one JSON line to that
    file, which is checked to be writable before the evaluation starts. Returns the result:
    :func:`bitalloc.models.evaluate`'s keys plus ``model``, ``kl_to``, the
    :func:`evaluation_labels` (``label`` overridden by ``label``) and the evaluated model's
    :func:`bitalloc.apply.summary.parameter_counts` (``params`` counts packed targets at rows x cols). ``progress`` shows bars in
    tokens (sampling, perplexity, KL). ``verify`` (default) checks an applied directory's SHA-256
    digests before loading it (see :func:`bitalloc.load`).
    """
    check_model_spec(spec)  # a mistyped path or an unreachable text source fails before any model loads
    check_model_spec(kl_to, flag="--kl-to")
    check_text_source(data, flag="--data")
    labels = evaluation_labels(spec)
    check_appendable(append)  # fail before the (long) evaluation, creating nothing
    model, tokenizer = load_model_or_applied(spec, device=device, verify=verify)
    source = labels["source_model"]
    if kl_to is None and source and kl:
        kl_to = source
    reference = None
    if kl_to is not None and kl:
        reference, _ = load_model_or_applied(kl_to, device=device, verify=verify)
    text_model = None
    if is_self_source(data) and source and reference is None:
        text_model, _ = load_model_or_applied(source, device=device, verify=verify)
    result = evaluate(model, tokenizer, data=data, seqlen=seqlen, windows=windows, kl_to=reference,
                      text_model=text_model, progress=progress)
    result["model"] = model_id(spec)
    result.update(parameter_counts(model))
    result["kl_to"] = kl_to if reference is not None else None
    result.update({k: v for k, v in labels.items() if k != "source_model"})
    if label:
        result["label"] = label
    if append is not None:
        line = json.dumps(result, default=str) + "\n"
        with open(append, "a", encoding="utf-8") as f:  # the file appears only with its first full line
            f.write(line)
    return result


def model_info(spec: str | os.PathLike[str] | None, *, include: Any = None, exclude: Any = None) -> dict[str, Any]:
    """The targets, shapes and parameter counts of a model or an applied directory.

    :func:`bitalloc.models.model_summary`'s keys, with every parameter counted once in one class:
    ``target_params`` (the targets ``include``/``exclude`` select), ``filtered_params`` (the
    targets of the default rule that they leave out; ``filtered_targets`` counts them),
    ``other_params`` = ``non_target_params`` (no target at all: embeddings, norms, biases ...)
    and ``total_params``, their sum. In an applied directory the packed targets
    (``QuantizedLinear``) are targets too, listed with their ``config`` and counted at
    rows x cols; ``packed_targets`` counts the selected ones.
    """
    model, _ = load_model_or_applied(spec)
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    packed = [{"name": n, "type": type(m).__name__, "rows": m.out_features, "cols": m.in_features,
               "params": m.out_features * m.in_features, "config": m.config.name}
              for n, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    default = _plain_rows(model, None, None)
    chosen_plain = _plain_rows(model, include, exclude) if (include or exclude) else default
    chosen = sorted([r for r in packed if _selected(r["name"], include, exclude)] + chosen_plain,
                    key=lambda r: order[r["name"]])
    if not chosen:
        find_targets(model, include=include, exclude=exclude)  # the usual error, listing the layers
    every = {r["name"]: r for r in packed + default + chosen_plain}
    modules = dict(model.named_modules())
    weight_ids = {id(modules[n].weight) for n in every if n not in {r["name"] for r in packed}}
    others = [{"name": n, "shape": list(p.shape), "params": p.numel()} for n, p in model.named_parameters()
              if id(p) not in weight_ids]
    counts = parameter_counts(model)
    target_params = sum(r["params"] for r in chosen)
    all_target_params = sum(r["params"] for r in every.values())
    other = counts["params"] - all_target_params
    return {
        "model": type(model).__name__,
        "targets": chosen,
        "n_targets": len(chosen),
        "packed_targets": sum(1 for r in chosen if "config" in r),
        "target_params": int(target_params),
        "filtered_targets": len(every) - len(chosen),
        "filtered_params": int(all_target_params - target_params),
        "non_target_params": int(other),
        "other_params": int(other),
        "total_params": int(counts["params"]),
        "non_target_tensors": others,
    }


def _plain_rows(model: Any, include: Any, exclude: Any) -> list[dict[str, Any]]:
    """:func:`bitalloc.models.model_summary`'s target rows, or none when no plain target is selected."""
    try:
        return model_summary(model, include=include, exclude=exclude)["targets"]
    except ValueError:
        return []


def _selected(name: str, include: Any, exclude: Any) -> bool:
    """Whether ``include``/``exclude`` (regexes or lists of them) select a packed target ``name``."""
    def matches(patterns: Any) -> bool:
        items = [patterns] if isinstance(patterns, (str, re.Pattern)) else list(patterns)
        return any(re.search(p, name) for p in items)

    return (include is None or matches(include)) and (exclude is None or not matches(exclude))
