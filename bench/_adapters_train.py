"""Training and scoring the real LoRA adapters of ``bench/adapters.py`` (CPU, PEFT).

Two adapters on one base model, rank 16 on every linear layer of the blocks:

- ``lm``: causal language modelling on the first part of a text (WikiText-2 validation), the
  tail held out; metric: perplexity on held-out windows.
- ``add``: ``a+b=c`` addition written as text, loss on the answer only; metric: exact match of
  greedy decoding (KV cache) on a seeded held-out set of problems.

Trained adapters are cached outside the repository as plain PEFT directories and reused when
the settings and the base model are the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("adapters")

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SETTINGS_FILE = "bench-train.json"


@dataclass(frozen=True)
class TrainSettings:
    """What a trained adapter depends on (its cache key)."""

    task: str  # "lm" or "add"
    rank: int = 16
    alpha: float = 32.0
    steps: int = 200
    batch: int = 4
    seqlen: int = 128  # lm: tokens per window
    digits: int = 3  # add: operands have up to this many digits
    lr: float = 1e-3
    warmup: int = 10
    heldout: float = 0.1  # lm: the text's tail fraction kept for evaluation
    seed: int = 0

    def key(self, model_id: str) -> str:
        """A short digest of the settings and the base model's identity."""
        text = json.dumps({"settings": asdict(self), "model": model_id}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


# ----- data ----------------------------------------------------------------------------------
def split_text_ids(tokenizer: Any, text: str, heldout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of the whole text, cut into a training head and a held-out tail."""
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    cut = int(ids.numel() * (1.0 - heldout))
    return ids[:cut], ids[cut:]


def addition_problems(n: int, digits: int, seed: int, exclude: set[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """``n`` distinct seeded pairs ``(a, b)``, each operand with 1 to ``digits`` digits (length drawn first)."""
    rng = random.Random(seed)
    seen = set(exclude or ())
    out: list[tuple[int, int]] = []
    while len(out) < n:
        pair = tuple(rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)
                     for d in (rng.randint(1, digits), rng.randint(1, digits)))
        if pair not in seen:
            seen.add(pair)
            out.append(pair)  # type: ignore[arg-type]
    return out


def prompt_of(a: int, b: int) -> str:
    return f"{a}+{b}="


def _stop_id(tokenizer: Any) -> int:
    return int(tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0)


def addition_batch(tokenizer: Any, pairs: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (answer tokens and the stop token only)."""
    stop = _stop_id(tokenizer)
    rows, labels = [], []
    for a, b in pairs:
        p = tokenizer(prompt_of(a, b), add_special_tokens=False)["input_ids"]
        c = tokenizer(str(a + b), add_special_tokens=False)["input_ids"] + [stop]
        rows.append(p + c)
        labels.append([-100] * len(p) + c)
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), stop, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, l) in enumerate(zip(rows, labels)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab[i, : len(l)] = torch.tensor(l)
    return ids, mask, lab


# ----- training ------------------------------------------------------------------------------
def _lr_at(step: int, s: TrainSettings) -> float:
    if step < s.warmup:
        return s.lr * (step + 1) / s.warmup
    progress = (step - s.warmup) / max(1, s.steps - s.warmup)
    return s.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def train_adapter(model: torch.nn.Module, tokenizer: Any, settings: TrainSettings, out: Path,
                  train_ids: torch.Tensor | None = None, heldout_pairs: set[tuple[int, int]] | None = None) -> dict[str, Any]:
    """Train one LoRA adapter on ``model`` (modified in place) and save it as a PEFT directory ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(settings.seed)
    targets = [t for t in TARGETS if any(n.endswith(t) for n, _ in model.named_modules())]
    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, target_modules=targets, lora_dropout=0.0,
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed)
    rng_seed = settings.seed * 7919 + 1
    peft_model.train()
    losses: list[float] = []
    t0 = time.perf_counter()
    tokens = 0
    if settings.task == "add":
        train_pairs = addition_problems(settings.steps * settings.batch, settings.digits, rng_seed, heldout_pairs)
    for step in range(settings.steps):
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, settings)
        if settings.task == "lm":
            assert train_ids is not None
            starts = torch.randint(0, train_ids.numel() - settings.seqlen - 1, (settings.batch,), generator=gen)
            ids = torch.stack([train_ids[s: s + settings.seqlen] for s in starts.tolist()])
            out_ = peft_model(input_ids=ids, labels=ids)
            tokens += ids.numel()
        else:
            pairs = train_pairs[step * settings.batch: (step + 1) * settings.batch]
            ids, mask, lab = addition_batch(tokenizer, pairs)
            out_ = peft_model(input_ids=ids, attention_mask=mask, labels=lab)
            tokens += int(mask.sum())
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out_.loss.detach()))
        if step % 10 == 0 or step == settings.steps - 1:
            elapsed = time.perf_counter() - t0
            log.info("%s step %d/%d loss %.4f (%.2f s/step)", settings.task, step + 1, settings.steps,
                     sum(losses[-10:]) / len(losses[-10:]), elapsed / (step + 1))
    seconds = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    peft_model.save_pretrained(str(out))
    info = {"settings": asdict(settings), "seconds": seconds, "tokens": tokens, "targets": targets,
            "loss_first10": sum(losses[:10]) / min(10, len(losses)), "loss_last10": sum(losses[-10:]) / min(10, len(losses)),
            "trainable_params": sum(p.numel() for p in params)}
    (out / SETTINGS_FILE).write_text(json.dumps(info, indent=1))
    return info


# ----- scoring -------------------------------------------------------------------------------
@torch.no_grad()
def heldout_perplexity(model: torch.nn.Module, windows: torch.Tensor, batch: int = 4) -> float:
    """Perplexity over non-overlapping windows (mean token NLL, exponentiated)."""
    total, count = 0.0, 0
    for i in range(0, windows.shape[0], batch):
        ids = windows[i: i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum")
        total += float(nll)
        count += ids[:, 1:].numel()
    return math.exp(total / count)


@torch.no_grad()
def exact_match(model: torch.nn.Module, tokenizer: Any, pairs: list[tuple[int, int]], digits: int, batch: int = 100) -> float:
    """Fraction of problems whose greedy answer (KV cache, left padding) is exactly ``a + b``."""
    stop = _stop_id(tokenizer)
    right = 0
    for i in range(0, len(pairs), batch):
        chunk = pairs[i: i + batch]
        prompts = [tokenizer(prompt_of(a, b), add_special_tokens=False)["input_ids"] for a, b in chunk]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(chunk), width), stop, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, p in enumerate(prompts):
            ids[j, width - len(p):] = torch.tensor(p)
            mask[j, width - len(p):] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=digits + 2, do_sample=False,
                             use_cache=True, pad_token_id=stop, eos_token_id=stop)
        for (a, b), row in zip(chunk, out[:, width:]):
            text = tokenizer.decode(row.tolist(), skip_special_tokens=True)
            digits_only = ""
            for ch in text.strip():
                if not ch.isdigit():
                    break
                digits_only += ch
            right += digits_only == str(a + b)
    return right / len(pairs)


def ensure_adapter(model_spec: str | None, settings: TrainSettings, cache: Path, name: str,
                   text: str | None = None, heldout_pairs: set[tuple[int, int]] | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached PEFT directory of adapter ``name`` trained with ``settings``; trains it when missing."""
    from bitalloc.identity import model_id
    from bitalloc.models import load_model

    folder = cache / settings.key(model_id(model_spec)) / name
    info_path = folder / SETTINGS_FILE
    if info_path.is_file() and (folder / "adapter_config.json").is_file():
        log.info("reusing trained adapter %s", folder)
        return folder, json.loads(info_path.read_text()) | {"cached": True}
    model, tokenizer = load_model(model_spec)
    train_ids = None
    if settings.task == "lm":
        assert text is not None
        train_ids, _ = split_text_ids(tokenizer, text, settings.heldout)
    tmp = folder.with_name(folder.name + ".tmp")
    info = train_adapter(model, tokenizer, settings, tmp, train_ids=train_ids, heldout_pairs=heldout_pairs)
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder, info | {"cached": False}


def heldout_problems(n: int, digits: int, seed: int) -> list[tuple[int, int]]:
    """The seeded evaluation problems (training problems never include them)."""
    return addition_problems(n, digits, 1_000_003 + seed)
