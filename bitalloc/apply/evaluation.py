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
import time
from typing import Any, Sequence

import torch

from bitalloc.apply.layout import is_applied_dir, read_info
from bitalloc.apply.loader import load_model_or_applied
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.apply.summary import parameter_counts
from bitalloc.identity import model_id
from bitalloc.models import evaluate_many, find_targets, model_summary
from bitalloc.models.text import is_self_source
from bitalloc.preflight import check_appendable, check_model_spec, check_text_source

__all__ = ["evaluate_model", "evaluate_models", "evaluation_labels", "model_info"]


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
    return evaluate_models([spec], data=data, seqlen=seqlen, windows=windows, kl_to=kl_to, kl=kl,
                           labels=None if label is None else [label], append=append, device=device,
                           progress=progress, verify=verify)[0]


def evaluate_models(
    specs: Sequence[str | os.PathLike[str] | None],
    *,
    data: str = "wikitext2",
    seqlen: int = 2048,
    windows: int | None = None,
    kl_to: str | None = None,
    kl: bool = True,
    labels: Sequence[str | None] | None = None,
    append: str | os.PathLike[str] | None = None,
    device: str = "auto",
    progress: bool = True,
    verify: bool = True,
) -> list[dict[str, Any]]:
    """:func:`evaluate_model` of several models or applied directories, sharing the work they can.

    Models made from the same original (applied directories of one model, and that model
    itself) are evaluated together in one pass over the text: the text is read once, each
    window runs through their KL reference once, and the original, when listed, is scored
    from the reference's own logits (its ``kl`` is 0). They are held in memory together.
    Models of different originals are evaluated one group after another. ``labels`` (one per
    spec, None keeps the default) name the results. Each group's results are appended to
    ``append`` in one write as soon as the group is done. Results come back in the order of
    ``specs``; ``seconds`` is the wall time of the group's pass (loads included), shared by
    its models, and ``model_seconds`` each model's own forward passes.
    """
    specs = list(specs) or [None]
    if labels is not None and len(labels) != len(specs):
        raise ValueError(f"{len(labels)} labels for {len(specs)} models: give one --label per model, in order")
    for spec in specs:  # a mistyped path or an unreachable text source fails before any model loads
        check_model_spec(spec)
    check_model_spec(kl_to, flag="--kl-to")
    check_text_source(data, flag="--data")
    check_appendable(append)  # fail before the (long) evaluation, creating nothing
    described = [evaluation_labels(spec) for spec in specs]
    groups: dict[str, list[int]] = {}
    for i, (spec, info) in enumerate(zip(specs, described)):
        groups.setdefault(info["source_model"] or model_id(spec), []).append(i)
    results: list[dict[str, Any] | None] = [None] * len(specs)
    for source, members in groups.items():
        started = time.perf_counter()
        rows = _evaluate_group(source, [specs[i] for i in members], [described[i] for i in members], data=data,
                               seqlen=seqlen, windows=windows, kl_to=kl_to, kl=kl, device=device,
                               progress=progress, verify=verify)
        for i, row in zip(members, rows):
            row["seconds"] = time.perf_counter() - started
            if labels is not None and labels[i]:
                row["label"] = labels[i]
            results[i] = row
        if append is not None:
            lines = "".join(json.dumps(results[i], default=str) + "\n" for i in members)
            with open(append, "a", encoding="utf-8") as f:  # the file appears only with its first full lines
                f.write(lines)
    return [r for r in results if r is not None]


def _evaluate_group(source: str, specs: list[Any], described: list[dict[str, Any]], *, data: str, seqlen: int,
                    windows: int | None, kl_to: str | None, kl: bool, device: str, progress: bool,
                    verify: bool) -> list[dict[str, Any]]:
    """The results of models made from one original ``source`` (see :func:`evaluate_models`)."""
    applied = any(info["source_model"] for info in described)
    reference_spec = kl_to if kl_to is not None else (source if applied else None)
    if not kl:
        reference_spec = None
    loaded: dict[str, tuple[torch.nn.Module, Any]] = {}

    def load(spec: Any) -> tuple[torch.nn.Module, Any]:
        key = os.path.abspath(spec) if spec and os.path.exists(spec) else model_id(spec)
        if key not in loaded:
            loaded[key] = load_model_or_applied(spec, device=device, verify=verify)
        return loaded[key]

    reference = None if reference_spec is None else load(reference_spec)[0]
    pairs = [load(spec) for spec in specs]
    text_model = None
    if is_self_source(data) and applied and reference is None:
        text_model = load(source)[0]
    models = [model for model, _ in pairs]
    results = evaluate_many(models, pairs[0][1], data, seqlen, windows, reference, progress=progress,
                            text_model=text_model)
    for spec, info, model, result in zip(specs, described, models, results):
        result["model"] = model_id(spec)
        result.update(parameter_counts(model))
        result["kl_to"] = reference_spec if reference is not None else None
        result.update({k: v for k, v in info.items() if k != "source_model"})
    return results


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
