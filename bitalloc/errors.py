"""The library's error classes: what the ``bitalloc`` command reports as one line and exit status 2.

Every error bitalloc raises on purpose derives from :class:`BitallocError`, and from the
built-in class that fits it (``ValueError``, ``FileExistsError``...), so callers may catch
either. The kinds:

- :class:`InputError`: an argument, a file or a model that cannot be used as given;
- :class:`IntegrityError`: a file bitalloc wrote is damaged, incomplete or changed since;
- :class:`OutputExistsError`: an output is already there and ``force`` was not given;
- :class:`OutputBusyError`: another process is writing the same output;
- :class:`UnavailableError`: something needed is not installed or cannot run here.
"""

from __future__ import annotations

__all__ = ["BitallocError", "InputError", "IntegrityError", "OutputBusyError", "OutputExistsError", "UnavailableError"]


class BitallocError(Exception):
    """Base class of every error bitalloc raises on purpose; its message is one clear line."""


class InputError(BitallocError, ValueError):
    """An argument, file or model that cannot be used as given."""


class IntegrityError(BitallocError, ValueError):
    """A file bitalloc wrote is damaged, incomplete, or was changed after it was written."""


class OutputExistsError(BitallocError, FileExistsError):
    """An output exists and would be replaced; pass ``force`` (``--force``) to replace it."""


class OutputBusyError(BitallocError, RuntimeError):
    """Another process holds the lock of an output (its pid and host are in the message)."""


class UnavailableError(BitallocError, RuntimeError):
    """A component the request needs is not installed or cannot run here."""
