"""Loading a script of ``bench/`` as a module, for the tests of its pure parts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]


def load_bench(file: str, name: str | None = None) -> ModuleType:
    """``bench/<file>`` imported as module ``name`` (default: the file's stem), with ``bench/`` on the path
    so that its private helpers (``_profiles``, ...) import."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name or Path(file).stem, ROOT / "bench" / file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
