"""Code fingerprints: a hash of the code of a package module and every package module it imports,
transitively (import statements anywhere in a module, and module names written as strings for late
imports), as syntax trees without docstrings and comments. The stage keys (`stages/keys.py`) and
the synthetic source's marker use them; this module imports nothing of the package, so a module
that asks for its own fingerprint does not pull the key machinery into it, and it sits on the
bottom floor, below `synthetic/` (which the stages import), not in `stages/`."""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

PACKAGE = "refany3d"
_ROOT = Path(__file__).resolve().parent  # the refany3d package directory


def _hash(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def _module_path(name: str) -> Path | None:
    """Source file of package module `name` (`refany3d.a.b`), or None if it is not one."""
    if name != PACKAGE and not name.startswith(PACKAGE + "."):
        return None
    base = _ROOT.joinpath(*name.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _parsed(name: str) -> tuple[str, tuple[str, ...]]:
    """(digest of module `name`'s code, package modules it imports other than itself)."""
    digest, refs = code_digest(_module_path(name).read_text())
    return digest, tuple(m for m in refs if _module_path(m) is not None and m != name)


def code_digest(source: str) -> tuple[str, tuple[str, ...]]:
    """(hash of the syntax tree of Python `source` without docstrings and comments, sorted
    names of the package modules it refers to and their parent packages)."""
    tree = ast.parse(source)
    refs: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            refs.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            refs.add(node.module)
            refs.update(f"{node.module}.{alias.name}" for alias in node.names)  # submodules
        elif (
            isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(PACKAGE)
        ):
            refs.add(node.value)  # importlib.import_module("refany3d....")
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Module):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    body[0].value.value = ""  # docstrings do not decide outputs
    modules = set()
    for ref in refs:  # `import a.b.c` also runs a and a.b
        parts = ref.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    digest = hashlib.sha256(ast.dump(tree).encode()).hexdigest()
    return digest, tuple(sorted(m for m in modules if m.split(".")[0] == PACKAGE))


@functools.cache
def module_closure(name: str) -> tuple[str, ...]:
    """`name` and every package module it imports, directly or not, sorted."""
    seen, todo = set(), [name]
    while todo:
        module = todo.pop()
        if module not in seen and _module_path(module) is not None:
            seen.add(module)
            todo.extend(_parsed(module)[1])
    return tuple(sorted(seen))


@functools.cache
def module_fingerprint(module: str) -> str:
    """Hash of the code of package module `module` and of every package module it imports."""
    if _module_path(module) is None:
        return "missing"
    return _hash([(m, _parsed(m)[0]) for m in module_closure(module)])
