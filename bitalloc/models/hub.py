"""Talking to the Hugging Face hub without ever hanging on it.

A hub id is first looked up in the local Hugging Face cache. Only when it is not there do we
ask whether the hub can be reached at all: offline mode (``HF_HUB_OFFLINE``) answers at once, and
otherwise one short TCP connection probe decides, so that a machine without internet fails in
seconds with a message that says what to do instead of waiting on retries.
"""

from __future__ import annotations

import re

from bitalloc.errors import InputError
from bitalloc.identity import BUILTIN_ALIAS
from bitalloc.preflight import PROBE_TIMEOUT_S, forget_probe_results, hub_endpoint, hub_reachable, is_offline


# "name" or "owner/name": letters, digits, '-', '_', '.'; no leading/trailing separators.
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?(?:/[A-Za-z0-9](?:[\w.\-]*[A-Za-z0-9_])?)?$")

ACCEPTED_MODEL_FORMS = (
    f"the built-in alias '{BUILTIN_ALIAS}' (or no model at all)",
    "a local Hugging Face model directory (config.json + weights)",
    "a path to a .gguf file",
    "a Hugging Face hub id such as 'HuggingFaceTB/SmolLM2-135M' (from the local HF cache, or "
    "downloaded when the hub is reachable)",
)


__all__ = ["ACCEPTED_MODEL_FORMS", "ModelNotFoundError", "PROBE_TIMEOUT_S", "accepted_forms_text",
           "forget_probe_results", "hub_endpoint", "hub_reachable", "is_offline", "looks_like_hub_id", "offline_error"]


class ModelNotFoundError(InputError):
    """The requested model cannot be found locally and cannot be fetched."""


def accepted_forms_text() -> str:
    """The accepted model specifications, one per line, for error messages."""
    return "\n".join(f"  - {form}" for form in ACCEPTED_MODEL_FORMS)


def looks_like_hub_id(spec: str) -> bool:
    """True when ``spec`` has the shape of a hub repository id (``name`` or ``owner/name``)."""
    return bool(_HUB_ID.match(spec)) and ".." not in spec and not spec.endswith((".gguf", ".json"))


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
