"""``bitalloc.load(DIR)``: rebuild an applied model with ``QuantizedLinear`` layers.

The model class comes from ``DIR/config.json`` (the same Auto-class rule as
:func:`bitalloc.models.load_model`); it is built without random initialization, every target
is replaced by a :class:`QuantizedLinear` holding its packed arrays, and the rest of the
state dict is read from ``model.safetensors``. With ``adapter=True`` the PEFT adapter in
``DIR/adapter`` is attached, so the model computes ``Q + L1 L2``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from bitalloc.apply.layout import ADAPTER_DIR, ARRAY_TO_BUFFER, MODEL_FILE, AppliedModelError, is_applied_dir, read_info
from bitalloc.apply.quantized_linear import QuantizedLinear
from bitalloc.configs import QuantConfig
from bitalloc.models import load_model, resolve_device
from bitalloc.models.loading import auto_class_for, check_finite, load_tokenizer, resolve_dtype

log = logging.getLogger(__name__)

__all__ = ["empty_model", "load", "load_applied", "load_model_or_applied"]


def _no_init_weights():
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()


def _skeleton(folder: Path, dtype: torch.dtype, model_class: str | None) -> torch.nn.Module:
    """The model of ``folder``'s config, without initialization: the bare model when ``model_class``
    (``bitalloc.json``'s) names it (a checkpoint without head weights), else :func:`auto_class_for`'s."""
    from transformers import AutoConfig, AutoModel
    from transformers.models.auto.modeling_auto import MODEL_MAPPING_NAMES

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    bare = MODEL_MAPPING_NAMES.get(getattr(config, "model_type", None))
    cls = AutoModel if model_class is not None and model_class == bare else auto_class_for(config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with _no_init_weights():
            model = cls.from_config(config, trust_remote_code=False)
    finally:
        torch.set_default_dtype(previous)
    return model


def empty_model(path: str | os.PathLike[str]) -> torch.nn.Module:
    """The model class of an applied directory, with the source model's Linear layers, on the meta
    device: its structure and shapes, no weights and no memory (what :func:`load` fills in)."""
    folder = Path(path)
    info = read_info(folder, check_files=False)
    with torch.device("meta"):
        return _skeleton(folder, torch.float32, info.get("model_class"))


def _resolve_dtype(dtype: Any, info: dict[str, Any]) -> torch.dtype:
    if dtype is None or dtype == "auto":
        dtype = info.get("dtype", "float32")
    value = resolve_dtype(dtype)
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ValueError(f"dtype must be a floating-point dtype, got {dtype!r}")
    return value


def _set_submodule(model: torch.nn.Module, name: str, module: torch.nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def load_applied(path: str | os.PathLike[str], adapter: bool = True, *, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype | None = None, cache_weights: bool = True,
                 verify: bool = True) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of an applied directory, for inference; see :func:`load`.

    ``cache_weights`` (default here) keeps each dequantized weight after its first use, so
    evaluation runs at dense speed at the memory cost of a dense model.
    """
    model = load(path, adapter=adapter, device=device, dtype=dtype, cache_weights=cache_weights, verify=verify)
    return model, load_tokenizer(Path(path))


def load(path: str | os.PathLike[str], adapter: bool = False, *, device: str | torch.device = "cpu",
         dtype: str | torch.dtype | None = None, cache_weights: bool = False, verify: bool = True) -> torch.nn.Module:
    """The model that ``bitalloc apply`` wrote to ``path``, with ``QuantizedLinear`` targets.

    ``adapter=True`` attaches the PEFT LoRA adapter (L1, L2; returns a ``PeftModel``), so the
    model computes ``Q + L1 L2``; a directory whose targets all have rank 0 has none, and then
    the plain model is returned with a warning. ``dtype`` is the compute dtype (default: the
    source model's). ``cache_weights`` keeps each dequantized weight after its first forward
    (dense speed, dense memory; set ``QuantizedLinear.cache_weight`` per layer to change it).
    The model is in eval mode on ``device``. Raises AppliedModelError (a
    ValueError) for a directory that is not a complete ``bitalloc apply`` output.

    ``verify`` (default) checks the SHA-256 of every file against ``bitalloc.json`` before
    loading, so a file whose bytes changed is refused, naming it; ``verify=False`` skips this
    (it reads every byte once more) and checks only that each file exists with its size.
    """
    folder = Path(path)
    info = read_info(folder, verify=verify)
    compute_dtype = _resolve_dtype(dtype, info)
    target_device = resolve_device(device)
    model = _skeleton(folder, compute_dtype, info.get("model_class"))
    modules = dict(model.named_modules())

    state: dict[str, torch.Tensor] = {}
    with safe_open(str(folder / MODEL_FILE), framework="pt") as f:
        keys = set(f.keys())
        for name, config_name in info["targets"].items():
            module = modules.get(name)
            if module is None:
                raise AppliedModelError(f"{folder}: target {name} is not a module of {type(model).__name__}")
            cfg = QuantConfig.from_name(config_name, allow_unusual=True)
            detail = info["target_details"][name]
            arrays = {}
            for array, buffer in ARRAY_TO_BUFFER.items():
                key = f"{name}.{buffer}"
                if key in keys:
                    arrays[array] = f.get_tensor(key)
            bias = getattr(module, "bias", None)
            qlinear = QuantizedLinear.from_arrays(arrays, (int(detail["rows"]), int(detail["cols"])), cfg,
                                                  bias=None if bias is None else torch.zeros(bias.shape),
                                                  compute_dtype=compute_dtype)
            qlinear.cache_weight = cache_weights
            _set_submodule(model, name, qlinear)
        wanted = set(model.state_dict())
        for key in keys:
            if ".lowrank." in key:
                continue
            if key not in wanted:
                raise AppliedModelError(f"{folder}/{MODEL_FILE} holds {key!r}, which {type(model).__name__} lacks")
            tensor = f.get_tensor(key)
            state[key] = tensor
    result = model.load_state_dict(state, strict=False)
    tied = info.get("tied", {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise AppliedModelError(f"{folder}/{MODEL_FILE} lacks {len(missing)} tensors, e.g. {missing[:3]}")
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    own = model.state_dict()
    for alias, stored in tied.items():  # a tie the model class does not make itself: copy the values
        if alias in own and stored in own and own[alias].data_ptr() != own[stored].data_ptr():
            with torch.no_grad():
                own[alias].copy_(own[stored])
    model.to(target_device)
    model.eval()
    if adapter:
        adapter_dir = folder / ADAPTER_DIR
        if not info.get("adapter") or not adapter_dir.is_dir():
            log.warning("%s has no adapter (every target has rank 0); returning the model without one", folder)
            return model
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir))
        model.to(target_device)
        model.eval()
    return model


def load_model_or_applied(spec: str | os.PathLike[str] | None, *, device: str | torch.device = "cpu",
                          dtype: str | torch.dtype | None = None, verify: bool = True) -> tuple[torch.nn.Module, Any]:
    """``(model, tokenizer)`` of a model specification or of an applied directory.

    An applied directory (one holding ``bitalloc.json``) is loaded for inference as
    ``Q + L1 L2`` (:func:`load_applied`, adapter attached when it has one); anything else goes to
    :func:`bitalloc.models.load_model`. ``dtype`` None means float32, ``"auto"`` the
    checkpoint's (for an applied directory: its source model's). ``verify``: see :func:`load`.
    """
    if spec is None or not is_applied_dir(spec):
        return load_model(spec, device=device, dtype=dtype)
    torch_dtype = resolve_dtype(dtype)
    has_adapter = bool(read_info(spec, check_files=False).get("adapter"))  # rank 0 everywhere: nothing to attach
    model, tokenizer = load_applied(spec, adapter=has_adapter, device=device,
                                    dtype=None if torch_dtype == "auto" else torch_dtype, verify=verify)
    check_finite(model)
    return model, tokenizer
