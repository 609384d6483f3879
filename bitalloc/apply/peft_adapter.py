"""Writing L1, L2 as a PEFT LoRA adapter whose every scale is exactly 1.

PEFT's LoRA computes ``base(x) + lora_B(lora_A(x)) * alpha / r``; with ``lora_A = L2``
(r x in), ``lora_B = L1`` (out x r) and ``alpha = r`` for each module (``rank_pattern`` and
``alpha_pattern``), the adapted layer computes ``x (Q + L1 L2)^T``. Keys follow PEFT's
``base_model.model.<module>.lora_A.weight`` convention (no adapter name), so
``PeftModel.from_pretrained(model, DIR/adapter)`` loads them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import save_file

from bitalloc.atomic import atomic_write_json

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def peft_key(module: str, which: str) -> str:
    """PEFT's saved key of ``lora_A``/``lora_B`` of ``module``."""
    return f"base_model.model.{module}.{which}.weight"


def adapter_config(factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *, base_model: str,
                   task_type: str | None) -> dict[str, Any]:
    """The ``adapter_config.json`` dict for ``{module: (L1, L2)}`` (all ranks > 0)."""
    ranks = {name: int(l1.shape[1]) for name, (l1, _) in factors.items()}
    top = max(ranks.values())
    pattern = {re.escape(name): r for name, r in ranks.items()}
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": top,
        "lora_alpha": top,
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
        "target_modules": sorted(ranks),
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
        "revision": None,
    }


def write_adapter(folder: Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                  base_model: str, task_type: str | None) -> None:
    """Write the adapter (``adapter_config.json`` and ``adapter_model.safetensors``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    for name, (l1, l2) in factors.items():
        tensors[peft_key(name, "lora_A")] = l2.detach().cpu().contiguous()
        tensors[peft_key(name, "lora_B")] = l1.detach().cpu().contiguous()
    save_file(tensors, str(folder / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    atomic_write_json(folder / ADAPTER_CONFIG, adapter_config(factors, base_model=base_model, task_type=task_type))


def task_type_for(model: torch.nn.Module) -> str | None:
    """PEFT's task type for a loaded model: CAUSAL_LM for generation models, else None."""
    from transformers import GenerationMixin
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if type(model).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or isinstance(model, GenerationMixin):
        return "CAUSAL_LM"
    return None
