"""Tiny seeded LoRA adapters saved with peft on a tiny seeded Llama model (shared by the adapter tests)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base(seed: int = 0):
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads) with seeded weights, float32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def make_adapter(folder: Path, *, seed: int, r: int = 8, alpha: float = 16, rslora: bool = False,
                 decay: float = 0.7, base_name: str = "tiny-llama", targets=TARGETS,
                 rank_pattern: dict | None = None, alpha_pattern: dict | None = None, base=None) -> Path:
    """A LoRA adapter with random non-zero factors (decaying spectrum), saved with save_pretrained
    (on ``base``, a model, or on :func:`tiny_base`)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_base() if base is None else base
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets), use_rslora=rslora,
                        lora_dropout=0.0, task_type="CAUSAL_LM", rank_pattern=rank_pattern or {},
                        alpha_pattern=alpha_pattern or {})
    peft_model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)
            elif "lora_B" in name:
                weights = decay ** torch.arange(param.shape[1], dtype=torch.float32)
                param.copy_(torch.randn(param.shape, generator=gen) * 0.05 * weights)
    peft_model.save_pretrained(str(folder))
    cfg_path = folder / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_name
    cfg_path.write_text(json.dumps(cfg))
    return folder
