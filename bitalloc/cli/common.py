"""What every `bitalloc` subcommand shares: output helpers, argument types and common arguments."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable, Sequence

from bitalloc.identity import BUILTIN_ALIAS

MODEL_FORMS = f"a Hugging Face hub id, a local directory, a .gguf file, or the built-in alias {BUILTIN_ALIAS}"
BUILTIN_HELP = f"model: {MODEL_FORMS} (default: {BUILTIN_ALIAS})"


# ----- output helpers --------------------------------------------------------------------
def print_json(obj: Any) -> None:
    """Print one JSON object on one line (the last line of --json output)."""
    print(json.dumps(obj, default=json_default))


def json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    return str(obj)


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ----- arguments ---------------------------------------------------------------------
def add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help=BUILTIN_HELP)


def add_target_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--include", default=None, help="regex: only layers whose name matches")
    p.add_argument("--exclude", default=None, help="regex: drop layers whose name matches")


def add_allow_unusual(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-unusual-config", action="store_true",
                   help="accept valid but unusual configs (a block or scale group that is not a power of two "
                        "from 8 or 4 to 1024), which are otherwise refused as likely typos")


def int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an int >= ``low``, else an error saying ``what`` was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
jobs_count = int_at_least(0, "a number of worker processes >= 0 (0: one per core)")


def float_list(text: str) -> tuple[float, ...]:
    """An argparse type: comma-separated positive numbers (``0.01,0.04``)."""
    try:
        values = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values
