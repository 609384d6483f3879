"""Talking to the Hugging Face hub without ever hanging on it.

A hub id is first looked up in the local Hugging Face cache. Only when it is not there do we
ask whether the hub can be reached at all: offline mode (``HF_HUB_OFFLINE``) answers at once, and
otherwise one short TCP connection probe decides, so that a machine without internet fails in
seconds with a message that says what to do instead of waiting on retries.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from urllib.parse import urlparse

from bitalloc.errors import InputError
from bitalloc.identity import BUILTIN_ALIAS

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 3.0
_TRUTHY = {"1", "on", "yes", "true"}
# "name" or "owner/name": letters, digits, '-', '_', '.'; no leading/trailing separators.
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?)?$")
_probe_results: dict[tuple[str, int], bool] = {}

ACCEPTED_MODEL_FORMS = (
    f"the built-in alias '{BUILTIN_ALIAS}' (or no model at all)",
    "a local Hugging Face model directory (config.json + weights)",
    "a path to a .gguf file",
    "a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M' (from the local HF cache, or "
    "downloaded when the hub is reachable)",
)


class ModelNotFoundError(InputError):
    """The requested model cannot be found locally and cannot be fetched."""


def accepted_forms_text() -> str:
    """The accepted model specifications, one per line, for error messages."""
    return "\n".join(f"  - {form}" for form in ACCEPTED_MODEL_FORMS)


def looks_like_hub_id(spec: str) -> bool:
    """True when ``spec`` has the shape of a hub repository id (``name`` or ``owner/name``)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec and not spec.endswith((".gguf", ".json"))


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


def offline_error(what: str, reason: str) -> ModelNotFoundError:
    """A ModelNotFoundError for a hub id that is neither cached locally nor downloadable."""
    return ModelNotFoundError(
        f"model {what!r} is not available offline: {reason}.\n"
        "Point bitalloc at a local copy instead:\n"
        "  - a local directory holding config.json + weights (+ tokenizer files), e.g. made on a "
        f"connected machine with `huggingface-cli download {what} --local-dir DIR` and copied here;\n"
        "  - or a .gguf file;\n"
        "  - or fill the Hugging Face cache (HF_HOME) on a connected machine and copy it here.\n"
        f"Accepted model specifications:\n{accepted_forms_text()}"
    )
