#!/usr/bin/env python3
"""Check the import rules of DESIGN.md's "Layers" section.

Usage: python scripts/check_imports.py [SRC_ROOT]      (default: src/blixard of this repo)

Every ``.py``/``.pyi`` file under SRC_ROOT is parsed with :mod:`ast` and every import is
checked, wherever it appears (module level, inside functions, under ``if TYPE_CHECKING:``):
``import blixard.x``, ``from blixard.x import y``, ``from blixard import x``, relative imports
(resolved against the file's own package) and ``importlib.import_module("blixard.x")`` /
``__import__("blixard.x")`` with a literal name.

Rules (an arrow = may import; a layer may always import from itself):

    domain → nothing of blixard          agent       → store, drivers, domain
    store → domain                       controllers → store, scheduler, domain
    scheduler → domain                   functions   → store, drivers, scheduler, domain
    drivers → domain                     api         → store, domain, functions
    images → domain                      client      → domain
    daemon → every layer                 cli         → client, domain
    sim → every layer but api and cli

Decisions this checker makes where DESIGN.md is silent:

* ``blixard/__init__.py`` imports nothing of blixard; ``blixard/__main__.py`` may import
  ``cli`` and ``daemon`` (the console entry point lives in daemon, the composition root).
  Any other file directly in SRC_ROOT, and any folder that is not a layer above, is itself
  reported: new code must go in a layer, or the table must grow.
* The root package ``blixard`` itself (``import blixard``, ``from blixard import __version__``)
  may be imported by every layer: its ``__init__`` is held to import nothing, so it cannot
  leak one layer into another. Nothing may import ``blixard.__main__``.
* "The rest of the code never imports an etcd or SQLite library": the modules in
  FOREIGN_STORE_LIBRARIES may be imported only inside ``blixard/store``.

Prints one ``path:line: <layer> may not import <target>`` per violation and exits 1;
exits 0 with a one-line summary when there is none; exits 2 on a usage error.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "blixard"

LAYERS: frozenset[str] = frozenset(
    {
        "domain",
        "store",
        "scheduler",
        "drivers",
        "agent",
        "controllers",
        "functions",
        "api",
        "client",
        "cli",
        "daemon",
        "images",
        "sim",
    }
)

# Which other layers each layer may import (its own layer is always allowed).
ALLOWED: dict[str, frozenset[str]] = {
    "domain": frozenset(),
    "store": frozenset({"domain"}),
    "scheduler": frozenset({"domain"}),
    "drivers": frozenset({"domain"}),
    "agent": frozenset({"store", "drivers", "domain"}),
    "controllers": frozenset({"store", "scheduler", "domain"}),
    "functions": frozenset({"store", "drivers", "scheduler", "domain"}),
    "api": frozenset({"store", "domain", "functions"}),
    "client": frozenset({"domain"}),
    "cli": frozenset({"client", "domain"}),
    "daemon": LAYERS,
    "images": frozenset({"domain"}),
    "sim": LAYERS - {"api", "cli"},
}
assert set(ALLOWED) == LAYERS

# Pseudo-layers for the two files allowed directly in the package folder.
INIT_LAYER = f"{PACKAGE}.__init__"
MAIN_LAYER = f"{PACKAGE}.__main__"
TOP_LEVEL_ALLOWED: dict[str, frozenset[str]] = {
    "__init__.py": frozenset(),
    "__main__.py": frozenset({"cli", "daemon"}),
}

# Only blixard/store may import these (top-level module names).
STORE_LAYER = "store"
FOREIGN_STORE_LIBRARIES: frozenset[str] = frozenset(
    {
        "sqlite3",
        "_sqlite3",
        "aiosqlite",
        "apsw",
        "pysqlite3",
        "etcd",
        "etcd3",
        "etcd3aio",
        "etcd3gw",
        "aetcd",
        "grpc",
    }
)

USAGE = "usage: python scripts/check_imports.py [SRC_ROOT]   (default: src/blixard)"
IMPORT_FUNCTIONS = frozenset({"import_module", "__import__"})


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    message: str

    def render(self) -> str:
        return f"{display(self.path)}:{self.line}: {self.message}"


@dataclass(frozen=True)
class Import:
    line: int
    target: str  # absolute dotted module name, e.g. "blixard.store.sqlite" or "sqlite3"
    resolved: bool = True  # False: a relative import reaching above the package


def display(path: Path) -> str:
    """The path relative to the working directory when it is under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def module_name(rel: Path) -> tuple[str, bool]:
    """Dotted module name of a file (relative to SRC_ROOT) and whether it is a package."""
    parts = list(rel.with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join([PACKAGE, *parts]), is_package


def resolve_relative(module: str, is_package: bool, level: int, name: str | None) -> str | None:
    """Absolute name of ``from <level dots><name> import ...`` in ``module``; None if invalid."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        return None  # beyond the top-level package
    base = package[: len(package) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def expand_from(base: str, names: list[ast.alias], root: Path) -> Iterator[str]:
    """Targets of ``from <base> import <names>``.

    ``from blixard import store`` imports the subpackage ``blixard.store``; ``from blixard
    import __version__`` imports the root package. Below the root, ``base`` itself names the
    layer, so it is the target.
    """
    if base != PACKAGE:
        yield base
        return
    for alias in names:
        candidate = root / alias.name
        if alias.name in LAYERS or candidate.is_dir() or candidate.with_suffix(".py").is_file():
            yield f"{PACKAGE}.{alias.name}"
        else:
            yield PACKAGE


def imports_of(tree: ast.AST, module: str, is_package: bool, root: Path) -> Iterator[Import]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = resolve_relative(module, is_package, node.level, node.module)
                if base is None:
                    written = "." * node.level + (node.module or "")
                    yield Import(node.lineno, f"{written} (above {PACKAGE})", resolved=False)
                    continue
            else:
                base = node.module or ""
            for target in expand_from(base, node.names, root):
                yield Import(node.lineno, target)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            fname = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else None
            )
            arg = node.args[0]
            if (
                fname in IMPORT_FUNCTIONS
                and isinstance(arg, ast.Constant)
                and isinstance(arg.value, str)
                and not arg.value.startswith(".")
            ):
                yield Import(node.lineno, arg.value)


def target_layer(target: str) -> str | None:
    """The blixard layer a target belongs to: "" for the root package, None if not blixard."""
    parts = target.split(".")
    if parts[0] != PACKAGE:
        return None
    return parts[1] if len(parts) > 1 else ""


def check_file(path: Path, root: Path) -> tuple[list[Violation], int]:
    """Violations in one file, and how many imports were checked."""
    rel = path.relative_to(root)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError) as exc:
        line = getattr(exc, "lineno", None) or 1
        return [Violation(path, line, f"cannot parse: {exc}")], 0

    if len(rel.parts) == 1:
        if rel.name in TOP_LEVEL_ALLOWED:
            layer = INIT_LAYER if rel.name == "__init__.py" else MAIN_LAYER
            allowed = TOP_LEVEL_ALLOWED[rel.name]
        else:
            msg = f"{rel.name} is not in a layer (only __init__.py and __main__.py may sit here)"
            return [Violation(path, 1, msg)], 0
    elif rel.parts[0] in LAYERS:
        layer = rel.parts[0]
        allowed = ALLOWED[layer] | {layer}
    else:
        msg = f"{rel.parts[0]}/ is not a layer of DESIGN.md (known: {', '.join(sorted(LAYERS))})"
        return [Violation(path, 1, msg)], 0

    module, is_package = module_name(rel)
    violations: list[Violation] = []
    count = 0
    for imp in imports_of(tree, module, is_package, root):
        count += 1
        if not imp.resolved:
            violations.append(Violation(path, imp.line, f"{layer} may not import {imp.target}"))
            continue
        dest = target_layer(imp.target)
        if dest is None:
            top = imp.target.split(".")[0]
            if top in FOREIGN_STORE_LIBRARIES and layer != STORE_LAYER:
                violations.append(Violation(path, imp.line, f"{layer} may not import {imp.target}"))
            continue
        if dest == "":
            continue  # the root package: imports nothing itself
        if dest not in allowed:
            violations.append(Violation(path, imp.line, f"{layer} may not import {imp.target}"))
    return violations, count


def python_files(root: Path) -> list[Path]:
    files = [
        p
        for pattern in ("*.py", "*.pyi")
        for p in root.rglob(pattern)
        if "__pycache__" not in p.relative_to(root).parts
    ]
    return sorted(files)


def main(argv: list[str]) -> int:
    if len(argv) > 1 or (argv and argv[0].startswith("-")):
        print(USAGE, file=sys.stderr)
        return 2
    default_root = Path(__file__).resolve().parent.parent / "src" / PACKAGE
    root = Path(argv[0]) if argv else default_root
    if not root.is_dir():
        print(f"check_imports: {root} is not a directory", file=sys.stderr)
        return 2
    files = python_files(root)
    if not files:
        print(f"check_imports: no Python files under {root}", file=sys.stderr)
        return 2

    violations: list[Violation] = []
    total = 0
    for path in files:
        found, count = check_file(path, root)
        violations.extend(found)
        total += count
    for violation in violations:
        print(violation.render())
    if violations:
        print(
            f"check_imports: {len(violations)} violation(s) in {len(files)} files",
            file=sys.stderr,
        )
        return 1
    print(f"check_imports: OK, {total} imports in {len(files)} files follow DESIGN.md's layers")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
