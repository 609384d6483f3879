"""docs/cli.md against the argparse parser: every flag of every command documented under its command.

The parser is walked (``bitalloc.cli.build_parser``), so a flag added to a command without a line in
docs/cli.md fails here, with the line to add and where.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bitalloc.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "cli.md"
HEADING = re.compile(r"^## (?:`bitalloc ?(?P<command>[a-z -]*)`|(?P<global>Global options))\s*$", re.M)


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(path, parser)`` of the top-level parser and of every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, path + (name,))


def has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def heading(path: tuple[str, ...]) -> str:
    return f"## `bitalloc {' '.join(path)}`" if path else "## Global options"


def documented() -> dict[tuple[str, ...], set[str]]:
    """Command path -> the flags named in the code spans that open its list items in docs/cli.md."""
    text = DOCS.read_text(encoding="utf-8")
    marks = list(HEADING.finditer(text))
    sections = {}
    for mark, following in zip(marks, marks[1:] + [None]):
        body = text[mark.end(): following.start() if following else len(text)]
        path = () if mark["global"] else tuple(mark["command"].split())
        flags = set()
        for item in re.findall(r"^- `([^`]*)`", body, re.M):
            flags.update(token.rstrip(",") for token in item.split() if token.startswith("-"))
        sections[path] = flags
    return sections


def flags_of(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {flag: action for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for flag in action.option_strings}


def doc_line(flag: str, action: argparse.Action) -> str:
    arg = "" if action.nargs == 0 else " " + (action.metavar or ("|".join(action.choices) if action.choices
                                                                 else action.dest.upper()))
    return f"- `{flag}{arg}`: {action.help}"


def test_every_flag_of_every_command_is_documented_in_docs_cli_md():
    sections = documented()
    todo = []
    for path, parser in commands(build_parser()):
        if path and has_subcommands(parser):  # a command group (`adapter`): its subcommands have the flags
            continue
        have = sections.get(path)
        missing = [doc_line(flag, action) for flag, action in flags_of(parser).items()
                   if have is None or flag not in have]
        if missing:
            where = heading(path) + ("" if have is not None else "  (a new section: add the heading too)")
            todo.append(f"docs/cli.md, under {where}, add:\n    " + "\n    ".join(missing))
    assert not todo, "flags in --help that docs/cli.md does not document:\n" + "\n".join(todo)


def test_docs_cli_md_documents_no_flag_or_command_the_parser_lacks():
    parsers = dict(commands(build_parser()))
    stale = []
    for path, flags in documented().items():
        if path not in parsers:
            stale.append(f"docs/cli.md: {heading(path)} names no command of `bitalloc`; remove the section")
            continue
        extra = sorted(flags - set(flags_of(parsers[path])))
        if extra:
            stale.append(f"docs/cli.md, under {heading(path)}: remove {', '.join(extra)} (not in --help)")
    assert not stale, "\n".join(stale)


def test_the_readme_links_the_command_reference():
    assert "(docs/cli.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_help_texts_exist_and_state_defaults_one_way():
    problems = []
    for path, parser in commands(build_parser()):
        for flag, action in flags_of(parser).items():
            where = f"bitalloc {' '.join(path)} {flag}".replace("  ", " ")
            if not action.help:
                problems.append(f"{where}: no help text")
            elif re.search(r"\(default [^)]", action.help):
                problems.append(f"{where}: write the default as '(default: X)': {action.help!r}")
            elif action.help.count("(default:") > 1:
                problems.append(f"{where}: states more than one default: {action.help!r}")
    assert not problems, "\n".join(problems)
