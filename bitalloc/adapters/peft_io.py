"""Reading PEFT LoRA adapter directories (``adapter_config.json`` + ``adapter_model.safetensors``).

Only plain LoRA on linear layers is read: IA3, DoRA, LoRA on embeddings or convolutions,
trained biases and ``modules_to_save`` are refused with a message saying so. Weights are read
from safetensors only (never a pickle ``adapter_model.bin``). A module's scale is
``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with ``use_rslora``, with PEFT's
``rank_pattern`` / ``alpha_pattern`` overrides.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from bitalloc.identity import file_digest

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


class AdapterError(ValueError):
    """An adapter directory that cannot be read as a plain PEFT LoRA adapter."""


@dataclass(frozen=True)
class LoraModule:
    """One LoRA module: ``ΔW = scale · B · A`` with ``A`` (rank x cols) and ``B`` (rows x rank)."""

    name: str
    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scale: float

    @property
    def rows(self) -> int:
        return int(self.lora_b.shape[0])

    @property
    def cols(self) -> int:
        return int(self.lora_a.shape[1])

    @property
    def rank(self) -> int:
        return int(self.lora_a.shape[0])

    def delta(self) -> torch.Tensor:
        """The dense ``scale · B · A`` in float64 (for tests and checks; profiling never forms it)."""
        return self.scale * (self.lora_b.double() @ self.lora_a.double())


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter read from ``path``, named ``name`` (its directory name by default)."""

    name: str
    path: str
    config: dict[str, Any]
    modules: tuple[LoraModule, ...]
    sha256: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def base_model(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def module(self, name: str) -> LoraModule:
        """The module called ``name``; KeyError naming the known ones otherwise."""
        for m in self.modules:
            if m.name == name:
                return m
        raise KeyError(f"adapter {self.name!r} has no LoRA module {name!r}")


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern lookup: a key matches a module name ending in it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _check_config(config: dict[str, Any], where: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise AdapterError(
            f"{where}: PEFT type {config.get('peft_type')!r} is not supported; only LoRA adapters "
            "(peft_type LORA) can be quantized with LoRAQuant"
        )
    if config.get("use_dora"):
        raise AdapterError(f"{where}: DoRA adapters (use_dora: true) are not supported; only plain LoRA")
    bias = config.get("bias", "none")
    if bias not in (None, "none"):
        raise AdapterError(f"{where}: trained biases (bias: {bias!r}) are not supported; only bias 'none'")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"{where}: modules_to_save {config['modules_to_save']} are not supported (full copies of "
            "layers are not LoRA factors)"
        )
    if config.get("fan_in_fan_out"):
        raise AdapterError(f"{where}: fan_in_fan_out adapters (GPT-2 Conv1D layout) are not supported")


def read_adapter(path: str | os.PathLike[str], name: str | None = None) -> LoraAdapter:
    """Read one PEFT LoRA adapter directory; raises :class:`AdapterError` with a clear message."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a directory (expected a PEFT adapter directory)")
    config_path = folder / ADAPTER_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{folder} is not a PEFT adapter: {ADAPTER_CONFIG} is missing")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{config_path} is not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{config_path} does not hold a JSON object")
    _check_config(config, folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        pickled = " (adapter_model.bin is a pickle, which bitalloc does not load)" if (folder / "adapter_model.bin").exists() else ""
        raise AdapterError(f"{folder}: {ADAPTER_WEIGHTS} is missing{pickled}")
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise AdapterError(f"{weights} is not a readable safetensors file ({exc})") from exc
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY_RE.match(key)
        if m is None:
            kind = "DoRA magnitude vectors are" if "lora_magnitude_vector" in key else "it is"
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA factor ({kind} not supported)")
        module = m["module"][len(PEFT_PREFIX):] if m["module"].startswith(PEFT_PREFIX) else m["module"]
        pairs.setdefault(module, {})[m["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{weights} holds no LoRA factors")
    r_default = int(config.get("r", 8))
    alpha_default = float(config.get("lora_alpha", r_default))
    modules = []
    for module in sorted(pairs):
        found = pairs[module]
        if set(found) != {"A", "B"}:
            missing = "lora_B" if "A" in found else "lora_A"
            raise AdapterError(f"{weights}: module {module!r} has no {missing} weight")
        a, b = found["A"], found["B"]
        if a.dim() != 2 or b.dim() != 2:
            raise AdapterError(
                f"{weights}: module {module!r} has {a.dim()}-D/{b.dim()}-D factors; only LoRA on linear "
                "layers (2-D factors) is supported"
            )
        if a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"{weights}: module {module!r} has ranks that disagree: lora_A is {tuple(a.shape)} "
                f"(rank {a.shape[0]}) but lora_B is {tuple(b.shape)} (rank {b.shape[1]})"
            )
        rank = int(a.shape[0])
        declared = int(_pattern_value(config.get("rank_pattern") or {}, module, r_default))
        if declared != rank:
            raise AdapterError(
                f"{weights}: module {module!r} has rank {rank} but {ADAPTER_CONFIG} declares r = {declared}"
            )
        alpha = float(_pattern_value(config.get("alpha_pattern") or {}, module, alpha_default))
        scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise AdapterError(f"{weights}: module {module!r} has NaN/inf entries")
        modules.append(LoraModule(name=module, lora_a=a.float(), lora_b=b.float(), scale=scale))
    return LoraAdapter(
        name=name or folder.resolve().name,
        path=str(folder.resolve()),
        config=config,
        modules=tuple(modules),
        sha256=file_digest(weights),
    )


def read_adapters(paths: Sequence[str | os.PathLike[str]], base_model: str | None = None) -> list[LoraAdapter]:
    """Read several adapters of one base model, each named by its directory name.

    Raises :class:`AdapterError` for a bad directory, two adapters with the same name, or
    adapters whose ``base_model_name_or_path`` differ (or differ from ``base_model`` when given).
    """
    if not paths:
        raise AdapterError("no adapter directories given")
    adapters = [read_adapter(p) for p in paths]
    names: dict[str, str] = {}
    for adapter in adapters:
        if adapter.name in names:
            raise AdapterError(
                f"two adapters are named {adapter.name!r} ({names[adapter.name]} and {adapter.path}); an adapter "
                "is named by its directory name, so rename one directory"
            )
        names[adapter.name] = adapter.path
    bases = {a.name: a.base_model for a in adapters if a.base_model}
    if base_model is not None:
        other = {n: b for n, b in bases.items() if b != base_model}
        if other:
            name, base = next(iter(other.items()))
            raise AdapterError(
                f"adapter {name!r} was trained on base model {base!r}, not on {base_model!r}"
            )
    elif len(set(bases.values())) > 1:
        raise AdapterError(
            f"the adapters belong to different base models ({dict(sorted(bases.items()))}); one profile holds "
            "adapters of one base model"
        )
    return adapters
