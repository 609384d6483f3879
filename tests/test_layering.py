"""Imports go one way, down the stage order (see DESIGN.md, "Rules of the house").

An ``ast`` walk over every module of ``bitalloc/`` (no module is imported) checks that

1. a module imports only modules of its own stage or of lower stages;
2. bitalloc modules are imported at module level, never inside a function or class
   (the commands of ``bitalloc/cli/`` aside: they import the stages lazily so that ``--help`` and
   argument errors answer fast);
3. no private name (``_name``) is imported from another module.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bitalloc"

#: The stages, lowest first: a module may import its own stage and the ones before it.
#: ``base`` holds the small helpers every stage may use; ``package`` is ``bitalloc/__init__.py``
#: (the lazy public re-exports), above everything.
STAGES = ("base", "configs", "quant", "lowrank", "models", "profiles", "solvers", "allocation", "apply",
          "adapters", "reports", "cli", "package")
#: First name under ``bitalloc`` -> stage; the stage of every other name is the name itself.
BASE_MODULES = {"atomic": "base", "errors": "base", "identity": "base", "preflight": "base"}
#: What any module may take from ``bitalloc/__init__.py`` itself (it defines it; importing it
#: pulls in no stage).
ROOT_NAMES = {"__version__"}
#: Modules that may import bitalloc modules inside functions.
LAZY_IMPORTERS = {"bitalloc.cli", "bitalloc.cli.adapter_commands", "bitalloc.cli.eval_command"}
RULES = (
    f"stage order: {' -> '.join(STAGES[1:-2])} (with {', '.join(sorted(k for k, v in BASE_MODULES.items() if v == 'base'))} "
    "at the bottom for every stage, and the cli and bitalloc/__init__.py on top)"
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(dotted: str) -> bool:
    """Whether ``dotted`` names a module or package of the source tree."""
    path = ROOT.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or path.is_dir()


def stage_of(module: str) -> str:
    """The stage of a dotted module name under ``bitalloc``."""
    parts = module.split(".")
    if parts == ["bitalloc"]:
        return "package"
    head = parts[1]
    stage = BASE_MODULES.get(head, head)
    if stage not in STAGES:
        raise AssertionError(
            f"module {module} belongs to no stage: add its top-level name {head!r} to STAGES or BASE_MODULES "
            f"in tests/test_layering.py, at its place in the {RULES}"
        )
    return stage


def _modules() -> list[tuple[str, Path]]:
    return sorted((_module_name(p), p) for p in PACKAGE.rglob("*.py"))


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module name an ``ImportFrom`` reads from (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, path: Path) -> list[tuple[int, str, list[str], bool]]:
    """``(line, imported module, names taken from it, nested in a function or class)`` of every
    import of a bitalloc module in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: list[tuple[int, str, list[str], bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name == "bitalloc" or alias.name.startswith("bitalloc."):
                        found.append((child.lineno, alias.name, [], nested))
            elif isinstance(child, ast.ImportFrom):
                source = _resolve(module, path, child)
                if source == "bitalloc" or source.startswith("bitalloc."):
                    names = [a.name for a in child.names]
                    found.append((child.lineno, source, names, nested))
                    # ``from bitalloc.quant import nf`` imports the module bitalloc.quant.nf too
                    found.extend((child.lineno, f"{source}.{n}", [], nested) for n in names
                                 if _is_module(f"{source}.{n}"))
            visit(child, inner)

    visit(tree, False)
    return found


MODULES = _modules()


def test_the_walk_sees_the_stages():
    names = {m for m, _ in MODULES}
    assert {"bitalloc", "bitalloc.cli", "bitalloc.identity", "bitalloc.models.loading", "bitalloc.apply.loader"} <= names
    assert stage_of("bitalloc.models.calibration") == "models" and stage_of("bitalloc.identity") == "base"
    assert stage_of("bitalloc.adapters.config") == "adapters" and stage_of("bitalloc") == "package"


def upward_imports(module: str, path: Path) -> list[str]:
    """The imports of ``path`` (the module ``module``) of a stage above its own."""
    own = STAGES.index(stage_of(module))
    wrong = []
    for line, target, names, _ in _imports(module, path):
        if target == "bitalloc":
            extra = sorted(set(names) - ROOT_NAMES) if names else ["bitalloc"]
            if extra and module != "bitalloc":
                wrong.append(f"line {line}: imports {', '.join(extra)} from the bitalloc package itself; import it "
                             "from the module that defines it (a stage at or below this one)")
            continue
        stage = stage_of(target)
        if STAGES.index(stage) > own:
            wrong.append(f"line {line}: {target} (stage {stage}) is above {module} (stage {stage_of(module)})")
    return wrong


def nested_imports(module: str, path: Path) -> list[str]:
    """The imports of bitalloc modules inside functions or classes of ``path``."""
    if module in LAZY_IMPORTERS:
        return []
    return [f"line {line}: {target}" for line, target, _, inside in _imports(module, path) if inside]


def private_imports(module: str, path: Path) -> list[str]:
    """The private names ``path`` imports from other modules."""
    return [f"line {line}: {n} from {target}" for line, target, names, _ in _imports(module, path)
            for n in names if n.startswith("_") and not n.startswith("__") and target != module]


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_imports_go_down_the_stages(module, path):
    wrong = upward_imports(module, path)
    assert not wrong, (
        f"{path.relative_to(ROOT)} imports upward:\n  " + "\n  ".join(wrong) + f"\nThe {RULES}. Move the shared "
        "code down to the lowest stage that needs it (a small helper used everywhere goes to bitalloc/identity.py "
        "or bitalloc/atomic.py), or pass what the lower stage needs as an argument."
    )


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_bitalloc_imports_are_at_module_level(module, path):
    nested = nested_imports(module, path)
    assert not nested, (
        f"{path.relative_to(ROOT)} imports bitalloc modules inside functions:\n  " + "\n  ".join(nested)
        + "\nMove them to the top of the module. If that makes a cycle, a module imports upward: fix that "
        "(see test_imports_go_down_the_stages). Function-level imports are for optional heavy third-party "
        "packages only (ray, numba, matplotlib, peft, datasets...)."
    )


@pytest.mark.parametrize("module,path", MODULES, ids=[m for m, _ in MODULES])
def test_no_private_names_cross_modules(module, path):
    private = private_imports(module, path)
    assert not private, (
        f"{path.relative_to(ROOT)} imports private names of other modules:\n  " + "\n  ".join(private)
        + "\nGive the name a public spelling (no leading underscore) and a docstring in the module that "
        "defines it, or move the code that needs it into that module."
    )


def test_the_checks_catch_what_they_forbid(tmp_path):
    """Each check flags a probe module written to break it, and passes a clean one."""
    probe = tmp_path / "probe.py"
    probe.write_text("from bitalloc.apply import load\n"
                     "from .fisher import _check_tokens\n"
                     "from bitalloc import profile\n"
                     "def f():\n    from bitalloc.configs import QuantConfig\n")
    name = "bitalloc.models.probe"
    assert [w.split(":")[0] for w in upward_imports(name, probe)] == ["line 1", "line 3"]
    assert nested_imports(name, probe) == ["line 5: bitalloc.configs"]
    assert private_imports(name, probe) == ["line 2: _check_tokens from bitalloc.models.fisher"]
    assert nested_imports("bitalloc.cli", probe) == []
    probe.write_text("from bitalloc import __version__\nfrom bitalloc.identity import cache_root\n"
                     "from bitalloc.models.fisher import estimate_fisher\n")
    assert upward_imports(name, probe) == nested_imports(name, probe) == private_imports(name, probe) == []
