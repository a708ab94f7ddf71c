"""Content keys of stage outputs: a hash of everything that decides what a stage writes.

The key of (stage, batch) chains the keys of the stage's inputs, so a change anywhere upstream —
a setting, a source file, the code of any stage before it — changes every key below it:

    key(stage, batch) = H(stage, the settings it reads, keys of its inputs, fingerprint of its code,
                          [source: the batch's row range and its file's fingerprint])

Keys say nothing about where a build writes (the build id and whether outputs exist are the
flow's business), so the same inputs give the same key, and the same shard names, in any directory.

The code fingerprint of a stage hashes the modules of this package that its module imports,
transitively (import statements anywhere in a module, and module names written as strings for late
imports), as syntax trees without docstrings: a changed comment or docstring in `render/` re-runs
nothing, a changed line of code re-runs exactly the stages that import it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from fsspec.core import url_to_fs

from refany3d.config import BuildSettings, settings_hash
from refany3d.stages.dag import STAGES, build_stages, plan_inputs, shard_columns

PACKAGE = "refany3d"
_ROOT = Path(__file__).resolve().parents[1]  # the refany3d package directory


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
def code_fingerprint(stage: str) -> str:
    """Hash of the code that decides `stage`'s output (its module and what it imports)."""
    module = f"{PACKAGE}.stages.{STAGES[stage].module}"
    if _module_path(module) is None:
        return "missing"  # a stage not built yet; the flow refuses to run it before keys matter
    return _hash([(m, _parsed(m)[0]) for m in module_closure(module)])


def settings_part(settings: BuildSettings, refs: tuple[str, ...]) -> dict[str, str]:
    """Hashes of the settings sections or dotted fields `refs` of `settings`."""
    out = {}
    for ref in refs:
        value: Any = settings
        for part in ref.split("."):
            value = getattr(value, part)
        out[ref] = settings_hash(value) if hasattr(value, "__dataclass_fields__") else _hash(value)
    return out


def file_fingerprint(url: str) -> str:
    """Hash of a Parquet file's size and footer (schema, row groups, their byte ranges and
    statistics): rewritten rows change it, and it costs one footer read, not the whole file."""
    fs, path = url_to_fs(url)
    with fs.open(path, "rb") as fh:
        footer = pq.ParquetFile(fh).metadata.to_dict()
    return _hash([fs.size(path), footer])


def batch_keys(settings: BuildSettings, batch_ident: str, file_hash: str) -> dict[str, str]:
    """The content key of every stage a build of `settings` runs on one source batch.

    `batch_ident` names the batch (file URL and row range), `file_hash` is `file_fingerprint` of
    its file."""
    keys: dict[str, str] = {}
    for stage in build_stages(settings.until):
        parts: dict[str, Any] = {
            "stage": stage,
            "settings": settings_part(settings, STAGES[stage].sections),
            "inputs": [keys[p] for p in plan_inputs(stage, settings.until)] if stage != "source" else [],
            "code": code_fingerprint(stage),
        }
        if stage == "source":
            parts["batch"] = [batch_ident, file_hash]
        if stage == "shard":
            parts["columns"] = shard_columns(settings.until)
        keys[stage] = f"{stage}-{_hash(parts)[:32]}"
    return keys
