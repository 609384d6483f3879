"""Tie groups from name patterns: matrices that must share one config (fused kernels).

Two matrices are tied by a pattern when the pattern matches both names and the names are
equal once the matched part is removed (their "layer key"): with ``\\.[qkv]_proj$``,
``model.layers.3.self_attn.q_proj`` and ``model.layers.3.self_attn.k_proj`` share the
key ``model.layers.3.self_attn`` and are tied; layer 4's q/k/v form another tie.
"""

from __future__ import annotations

import re
from typing import Sequence

#: Generic fusion patterns (no model names). Each ties, within one module, the matrices that
#: inference engines commonly fuse into one GEMM:
#:
#: * ``\.[qkv]_proj$``: q/k/v projections (LLaMA, Mistral, Qwen, Gemma, OPT, Phi, GPT-J, ...);
#: * ``\.(gate|up)_proj$``: SwiGLU gate/up (also per expert in MoE models);
#: * ``\.w[13]$``: Mixtral experts' and Meta-LLaMA's gate/up (w1, w3);
#: * ``\.attention\.w[qkv]$``: Meta-LLaMA's q/k/v (wq, wk, wv);
#: * ``\.(query|key|value)$``: BERT-style attention;
#: * ``(?<=Attention)\.[qkv]$``: T5-style attention.
#:
#: Already-fused matrices (GPT-2's ``attn.c_attn``, Falcon/NeoX ``query_key_value``,
#: Phi-3's ``qkv_proj``) need no tie. As a preset, patterns that match nothing are skipped.
FUSE_PRESET: tuple[str, ...] = (
    r"\.[qkv]_proj$",
    r"\.(gate|up)_proj$",
    r"\.w[13]$",
    r"\.attention\.w[qkv]$",
    r"\.(query|key|value)$",
    r"(?<=Attention)\.[qkv]$",
)

#: In a pattern list, this item stands for :data:`FUSE_PRESET`.
PRESET_TOKEN = "fuse"


def _compile(pattern: str, what: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{what} pattern must be a non-empty regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"{what} pattern {pattern!r} is not a valid regex: {exc}") from exc


def expand_tie_patterns(patterns: str | Sequence[str]) -> list[tuple[str, bool]]:
    """Patterns with a flag "from the preset" (preset patterns may match nothing)."""
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if tuple(patterns) == FUSE_PRESET:
        return [(p, True) for p in FUSE_PRESET]
    out: list[tuple[str, bool]] = []
    for p in patterns:
        if p == PRESET_TOKEN:
            out.extend((q, True) for q in FUSE_PRESET)
        else:
            out.append((p, False))
    return out


def tie_groups(names: Sequence[str], patterns: str | Sequence[str]) -> list[list[int]]:
    """Indices of tied matrices: one list per (pattern, layer key) with two or more members.

    ``patterns`` is a regex or a list of them (``re.search`` on each name); the item
    ``"fuse"`` (or passing :data:`FUSE_PRESET` itself) stands for the preset. A user
    pattern that matches no name, or a name matched by two patterns, is a ValueError.
    """
    names = [str(n) for n in names]
    owner: dict[int, str] = {}
    groups: dict[tuple[int, str], list[int]] = {}
    for p_idx, (pattern, from_preset) in enumerate(expand_tie_patterns(patterns)):
        regex = _compile(pattern, "tie")
        matched = False
        for m, name in enumerate(names):
            hit = regex.search(name)
            if hit is None:
                continue
            matched = True
            if m in owner and owner[m] != pattern:
                raise ValueError(
                    f"matrix {name!r} matches two tie patterns ({owner[m]!r} and {pattern!r}); "
                    "make the patterns disjoint"
                )
            owner[m] = pattern
            key = name[: hit.start()] + "\0" + name[hit.end() :]
            groups.setdefault((p_idx, key), []).append(m)
        if not matched and not from_preset:
            raise ValueError(f"tie pattern {pattern!r} matches no matrix name")
    ties = [members for members in groups.values() if len(members) > 1]
    ties.sort(key=lambda members: members[0])
    return ties
