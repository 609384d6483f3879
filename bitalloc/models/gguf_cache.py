"""GGUF files as Hugging Face models: dequantize once, cache as safetensors, reload in seconds.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) by dequantizing every
tensor to float, which takes a while and happens on every load. bitalloc converts each GGUF file
once, writes the result with ``save_pretrained`` (safetensors, plus the tokenizer) into a user cache
directory, and loads that afterwards. The cache entry's key includes the file's name, size and
modification time, so a changed file is converted anew. Entries are written into a temporary
directory and renamed into place, so an interrupted conversion never leaves a half-written entry.

The cache lives in ``gguf/`` under :func:`bitalloc.identity.cache_root`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bitalloc.identity import cache_root

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
CACHE_MARKER = "bitalloc-gguf.json"
STALE_TMP_SECONDS = 6 * 3600


def gguf_cache_key(gguf_path: str | os.PathLike) -> str:
    """A directory name for one GGUF file: its stem and a digest of its name, size and mtime."""
    path = Path(gguf_path)
    stat = path.stat()
    fingerprint = f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}|format{CACHE_FORMAT}"
    digest = hashlib.sha256(fingerprint.encode()).hexdigest()[:16]
    return f"{path.stem}-{digest}"


def gguf_cache_dir(gguf_path: str | os.PathLike) -> Path:
    """Where the converted copy of ``gguf_path`` lives (whether or not it exists yet)."""
    return cache_root() / "gguf" / gguf_cache_key(gguf_path)


def is_cached(gguf_path: str | os.PathLike) -> bool:
    """True when a complete converted copy of ``gguf_path`` is in the cache."""
    return (gguf_cache_dir(gguf_path) / CACHE_MARKER).is_file()


def forget_quantization(model: torch.nn.Module) -> None:
    """Make a model loaded from GGUF an ordinary float model.

    transformers keeps a GGUF quantizer on models it dequantized from GGUF, which refuses
    ``save_pretrained`` and dtype casts, and writes a ``quantization_config`` (gguf) entry into
    the config. The weights are plain floats by then, so both are dropped.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    for attr in ("hf_quantizer", "quantization_method"):
        if hasattr(model, attr):
            delattr(model, attr)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is None:
            continue
        if getattr(config, "_is_quantized", False):
            config._is_quantized = False
        if hasattr(config, "quantization_config"):
            del config.quantization_config


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> None:
    """Dequantize ``gguf_path`` and write it to ``out_dir`` as a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path).resolve()
    logger.info("converting %s (dequantizing every tensor; done once, then cached)", path)
    model = AutoModelForCausalLM.from_pretrained(path.parent, trust_remote_code=False, gguf_file=path.name,
                                                 dtype=torch.float32)
    forget_quantization(model)
    model.save_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, trust_remote_code=False, gguf_file=path.name)
    tokenizer.save_pretrained(out_dir)
    config_file = Path(out_dir) / "config.json"
    config = json.loads(config_file.read_text())
    if config.pop("quantization_config", None) is not None:
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _apply_umask(folder: Path) -> None:
    """Give a mkdtemp folder (mode 0700) and its files the permissions the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for file in folder.iterdir():
        file.chmod(0o666 & ~umask)


def _remove_stale_tmp_dirs(target: Path) -> None:
    """Delete temporary directories of ``target`` left by conversions killed hours ago."""
    now = time.time()
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        try:
            if now - leftover.stat().st_mtime > STALE_TMP_SECONDS:
                logger.info("removing %s, left by an interrupted conversion", leftover)
                shutil.rmtree(leftover, ignore_errors=True)
        except OSError:
            pass


def cached_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """The cache directory of a GGUF file's converted copy, converting it first if needed.

    The conversion is written to a temporary sibling directory and renamed into place at the
    end; if another process finished first, its entry is kept and ours discarded.
    """
    path = Path(gguf_path).resolve()
    target = gguf_cache_dir(path)
    if is_cached(path):
        logger.info("loading cached conversion of %s from %s", path.name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # a leftover without its marker: never a valid entry
        shutil.rmtree(target, ignore_errors=True)
    _remove_stale_tmp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        convert_gguf(path, tmp)
        stat = path.stat()
        marker = {
            "format": CACHE_FORMAT,
            "source": str(path),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
        }
        (tmp / CACHE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _apply_umask(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_cached(path):
                raise
            logger.info("another process cached %s first; using its copy", path.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("cached conversion of %s in %s", path.name, target)
    return target
