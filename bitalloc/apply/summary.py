"""What an applied directory holds, in counted parameters and real bytes.

``bitalloc.json``'s ``bits_per_param`` is taken over the targets an allocation covers (and the
targets kept dense with ``--keep-dense``). A profile made with ``--include`` (or ``apply --uniform
--include``) covers only some of the model's targets: the others stay in the model as they were
stored (float32, say) and can dominate the bytes on disk. :func:`applied_report` says what is
quantized, what is not, and how many bytes each part of the directory takes, and
:func:`parameter_counts` counts a loaded model's parameters with each packed target at its
logical size.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

from bitalloc.apply.layout import ADAPTER_DIR, DEQUANTIZED_DIR, INFO_FILE, MODEL_FILE, applied_summary, read_info
from bitalloc.apply.loader import empty_model
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.models import find_targets

__all__ = ["applied_report", "parameter_counts", "safetensors_index"]


def safetensors_index(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Tensor name -> ``dtype``, ``shape``, ``bytes`` of a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return {name: {"dtype": entry["dtype"], "shape": list(entry["shape"]),
                   "bytes": int(entry["data_offsets"][1] - entry["data_offsets"][0])}
            for name, entry in header.items()}


def _part_of(name: str) -> str:
    head = name.split("/", 1)[0]
    if head == MODEL_FILE:
        return MODEL_FILE
    if head in (ADAPTER_DIR, DEQUANTIZED_DIR) and "/" in name:
        return head + "/"
    return "config and tokenizer"


def applied_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`bitalloc.apply.applied_summary`'s keys, plus what is quantized, what is not, and the bytes.

    Added keys: ``model_targets`` (the targets the model has by the default rule: every
    Linear/Conv1D but the embeddings), ``quantized_params``; ``dense_targets``/``dense_params``
    (kept dense by ``--keep-dense``, counted in ``bits_per_param``); ``untouched_targets`` (names),
    ``untouched_params``, ``untouched_bytes``, ``untouched_dtypes`` (targets of the model that the
    allocation does not cover: stored as they were, outside ``bits_per_param``);
    ``other_params``/``other_bytes`` (embeddings, norms, biases ...); ``total_params``;
    ``bytes`` (part -> bytes: ``model.safetensors``, ``adapter/``, ``dequantized/``, ``config and
    tokenizer``, ``bitalloc.json``), ``total_bytes``, and ``model_bits_per_param_on_disk`` (8 x the
    bytes of ``model.safetensors`` and ``adapter/`` over ``total_params``: what the whole model costs).
    """
    folder = Path(path)
    summary = applied_summary(folder)
    info = read_info(folder)
    tensors = safetensors_index(folder / MODEL_FILE)
    tied = info.get("tied") or {}
    quantized = info["targets"]
    dense = info.get("dense_targets") or {}
    model_targets = [name for name, _ in find_targets(empty_model(folder))]
    untouched = [n for n in model_targets if n not in quantized and n not in dense]

    def stored(name: str) -> dict[str, Any] | None:
        key = f"{name}.weight"
        return tensors.get(tied.get(key, key))

    untouched_entries = [e for e in (stored(n) for n in untouched) if e is not None]
    untouched_params = sum(int(torch.Size(e["shape"]).numel()) for e in untouched_entries)
    untouched_bytes = sum(e["bytes"] for e in untouched_entries)
    quantized_params = sum(int(d["rows"]) * int(d["cols"]) for d in info["target_details"].values())
    dense_params = sum(int(d["rows"]) * int(d["cols"]) for d in dense.values())
    packed_prefixes = tuple(f"{name}." for name in quantized)
    weights_of = {f"{n}.weight" for n in list(untouched) + list(dense)}
    other = [e for k, e in tensors.items() if k not in weights_of and not
             (k.startswith(packed_prefixes) and k.rpartition(".")[2] != "bias")]
    other_params = sum(int(torch.Size(e["shape"]).numel()) for e in other)
    parts: dict[str, int] = {MODEL_FILE: 0, ADAPTER_DIR + "/": 0, DEQUANTIZED_DIR + "/": 0, "config and tokenizer": 0}
    for name, size in info["files"].items():
        parts[_part_of(name)] += int(size)
    parts[INFO_FILE] = (folder / INFO_FILE).stat().st_size
    total_params = quantized_params + dense_params + untouched_params + other_params
    summary.update({
        "model_targets": len(model_targets),
        "quantized_params": quantized_params,
        "dense_targets": len(dense),
        "dense_params": dense_params,
        "untouched_targets": untouched,
        "untouched_params": untouched_params,
        "untouched_bytes": untouched_bytes,
        "untouched_dtypes": sorted({e["dtype"] for e in untouched_entries}),
        "other_params": other_params,
        "other_bytes": sum(e["bytes"] for e in other),
        "total_params": total_params,
        "bytes": parts,
        "total_bytes": sum(parts.values()),
        "model_bits_per_param_on_disk": 8 * (parts[MODEL_FILE] + parts[ADAPTER_DIR + "/"]) / max(total_params, 1),
    })
    return summary


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """``params`` (every parameter, each packed target at rows x cols, shared tensors once),
    ``packed_params`` (those of ``QuantizedLinear`` targets) and ``packed_targets`` of a loaded model."""
    packed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    packed_params = sum(m.out_features * m.in_features for m in packed)
    plain = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    return {"params": int(plain + packed_params), "packed_params": int(packed_params), "packed_targets": len(packed)}
