"""The applied-model directory: file names, tensor key names and ``bitalloc.json``.

``bitalloc apply`` writes::

    DIR/model.safetensors     packed Q of every target + every non-target tensor unchanged
    DIR/bitalloc.json         format version, per-target configs, bits/param, provenance
    DIR/config.json ...       the model's config (and generation config), tokenizer files
    DIR/adapter/              a PEFT LoRA adapter with L1, L2 (scale 1), when any rank > 0
    DIR/dequantized/          with --dequantized: a plain HF checkpoint (Q in bf16)

In ``model.safetensors`` target ``T`` is stored as ``T.qweight`` (packed NF or integer codes),
its scale arrays ``T.scales`` or ``T.scale_codes``/``T.scale2``/``T.offset`` and, for an
``int`` config, its packed zero points ``T.qzeros``: exactly the buffers
of :class:`bitalloc.apply.QuantizedLinear`, so the file is that model's state dict. NF8
low-rank factors (``lowrank_bits == 8``) are stored packed too, under ``T.lowrank.l1t.*`` (L1
transposed) and ``T.lowrank.l2.*``; bf16 factors live only in the adapter, whose bytes are
counted. Tensors shared between modules (tied embeddings) are stored once; ``tied`` in
``bitalloc.json`` maps each alias to the stored name.

``bitalloc.json`` records every file's size (``files``) and SHA-256 (``sha256``): :func:`read_info`
refuses a directory whose files are missing or of another size, so a half-written or damaged
directory is never loaded, and with ``verify`` (what :func:`bitalloc.load` does by default) one
whose bytes changed. A directory written before digests were recorded loads unverified, with a
warning.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from bitalloc.errors import IntegrityError
from bitalloc.identity import file_digest

log = logging.getLogger(__name__)

FORMAT = "bitalloc-model"
FORMAT_VERSION = 1
INFO_FILE = "bitalloc.json"
MODEL_FILE = "model.safetensors"
ADAPTER_DIR = "adapter"
DEQUANTIZED_DIR = "dequantized"
#: QuantizedLinear buffer name -> QuantizedTensor array name
BUFFER_TO_ARRAY = {"qweight": "codes", "scales": "scales", "scale_codes": "scale_codes",
                   "scale2": "scale2", "offset": "offset", "qzeros": "zeros"}
ARRAY_TO_BUFFER = {v: k for k, v in BUFFER_TO_ARRAY.items()}


class AppliedModelError(IntegrityError):
    """A directory is not a complete, readable ``bitalloc apply`` output."""


def q_key(target: str, array: str) -> str:
    """Key in ``model.safetensors`` of array ``array`` (a QuantizedTensor array name) of Q."""
    return f"{target}.{ARRAY_TO_BUFFER[array]}"


def factor_key(target: str, factor: str, array: str) -> str:
    """Key of an NF8 low-rank factor array (``factor`` is ``l1t`` or ``l2``)."""
    return f"{target}.lowrank.{factor}.{ARRAY_TO_BUFFER[array]}"


def is_applied_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory holding a ``bitalloc.json``."""
    return (Path(path) / INFO_FILE).is_file()


def file_sizes(folder: Path) -> dict[str, int]:
    """Relative path -> size in bytes of every file under ``folder`` (sorted)."""
    sizes = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name != INFO_FILE:
            sizes[path.relative_to(folder).as_posix()] = path.stat().st_size
    return sizes


def file_digests(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under ``folder`` (the files :func:`file_sizes` lists)."""
    return {name: file_digest(folder / name) for name in file_sizes(folder)}


def _inside(folder: Path, name: Any) -> Path:
    """``folder / name``, refusing a name that leaves ``folder`` (absolute, ``..``, a link outside)."""
    if not isinstance(name, str) or not name or Path(name).is_absolute() or ".." in Path(name).parts:
        raise AppliedModelError(f"{folder / INFO_FILE} lists a file outside its directory ({name!r}); "
                                "it was not written by `bitalloc apply`")
    file = folder / name
    if file.exists() and not file.resolve().is_relative_to(folder.resolve()):
        raise AppliedModelError(f"{folder / INFO_FILE} lists {name!r}, which leads outside {folder}")
    return file


def verify_files(folder: Path, info: dict[str, Any]) -> None:
    """Check every file's SHA-256 against ``info["sha256"]``; raise AppliedModelError naming the changed ones.

    A directory without digests (written by an older bitalloc) passes with a warning."""
    digests = info.get("sha256")
    if digests is None:
        log.warning("%s records no SHA-256 digests (written by an older bitalloc): its files are not verified; "
                    "run `bitalloc apply` again to get a verified directory", folder)
        return
    if not isinstance(digests, dict) or set(digests) != set(info["files"]):
        raise AppliedModelError(f"{folder / INFO_FILE} has digests that do not match its file list; "
                                "run `bitalloc apply` again")
    changed = [name for name, digest in digests.items() if file_digest(_inside(folder, name)) != digest]
    if changed:
        raise AppliedModelError(
            f"{folder} was changed after `bitalloc apply` wrote it: {', '.join(changed[:5])} "
            f"{'does' if len(changed) == 1 else 'do'} not match the SHA-256 in {INFO_FILE}; "
            "run `bitalloc apply` again (or load with verify=False to skip this check)"
        )


def read_info(path: str | os.PathLike[str], *, check_files: bool = True, verify: bool = False) -> dict[str, Any]:
    """The ``bitalloc.json`` of an applied directory, checked for format and completeness.

    ``check_files`` checks that every listed file exists inside the directory with its size;
    ``verify`` also checks every file's SHA-256 (reading all the bytes), see :func:`verify_files`."""
    folder = Path(path)
    info_path = folder / INFO_FILE
    if not folder.is_dir():
        raise AppliedModelError(f"{folder} is not a directory; pass the DIR that `bitalloc apply --out DIR` wrote")
    if not info_path.is_file():
        raise AppliedModelError(
            f"{folder} has no {INFO_FILE}: it is not a `bitalloc apply` output (or the write did not finish); "
            "run `bitalloc apply ALLOC.json --out DIR` again"
        )
    try:
        info = json.loads(info_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AppliedModelError(f"{info_path} is not valid JSON ({exc}); run `bitalloc apply` again") from exc
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise AppliedModelError(f"{info_path} is not a bitalloc model description (format {FORMAT!r} expected)")
    version = info.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise AppliedModelError(
            f"{info_path} has format_version {version!r}; this bitalloc reads up to {FORMAT_VERSION}: upgrade bitalloc"
        )
    for key in ("targets", "target_details", "files"):
        if not isinstance(info.get(key), dict):
            raise AppliedModelError(f"{info_path} lacks {key!r}; run `bitalloc apply` again")
    if check_files:
        problems = []
        for name, size in info["files"].items():
            file = _inside(folder, name)
            if not file.is_file():
                problems.append(f"{name} is missing")
            elif file.stat().st_size != size:
                problems.append(f"{name} has {file.stat().st_size} bytes, {size} expected")
        if problems:
            raise AppliedModelError(
                f"{folder} is incomplete or damaged ({'; '.join(problems[:5])}); run `bitalloc apply` again"
            )
        if verify:
            verify_files(folder, info)
    return info


#: The ``bitalloc.json`` entries that :func:`applied_summary` reports.
SUMMARY_KEYS = ("model", "bits_per_param", "bits_per_param_on_disk", "target_params", "non_target_params", "fisher",
                "adapter", "dequantized", "seconds")


def applied_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The headline of an applied directory: :data:`SUMMARY_KEYS` of its ``bitalloc.json``,
    ``out`` (the directory) and ``targets`` (how many)."""
    info = read_info(path)
    summary = {k: info[k] for k in SUMMARY_KEYS}
    summary["out"] = str(path)
    summary["targets"] = len(info["targets"])
    return summary

