"""The package's import arrows run one way: no module reaches itself through its imports, the
package's parts (sub-packages and top-level modules) stack in floors, the test and bench fixtures
(`refany3d.testing`) sit on top, and nothing outside `tests/` imports `tests`."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for path in (ROOT / "refany3d").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its body (function-level imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(anchor[: len(anchor) - node.level + 1] + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph` (module → the modules it imports), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_circle_finds_a_two_module_circle():
    assert _circle({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == ["a", "b", "a"]
    assert _circle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_refany3d_has_no_import_circle():
    graph = _graph()
    assert "refany3d.models.weights" in graph["refany3d.models.perceptual"]  # the walk sees imports
    assert _circle(graph) is None, " -> ".join(_circle(graph))


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _part(module: str) -> str:
    """The part of the package `module` belongs to: `refany3d.models.pose.refine` → `refany3d.models`."""
    return ".".join(module.split(".")[:2])


def test_refany3d_parts_have_no_upward_arrow():
    parts: dict[str, set[str]] = {}
    for name, targets in _graph().items():
        parts.setdefault(_part(name), set()).update(_part(t) for t in targets if _part(t) != _part(name))
    assert "refany3d.models" in parts["refany3d.stages"]  # the walk sees imports between parts
    # a circle of parts is an arrow pointing up: the parts could not be stacked in floors
    assert _circle(parts) is None, " -> ".join(_circle(parts))


def test_only_tests_and_benches_import_the_testing_fixtures():
    importers = [
        name
        for name, targets in _graph().items()
        if _part(name) != "refany3d.testing" and any(_part(t) == "refany3d.testing" for t in targets)
    ]
    assert importers == []


def _outside_tests() -> list[Path]:
    """The repository's Python files outside `tests/` (and outside hidden folders and virtualenvs)."""
    files = [p for p in ROOT.glob("*.py")]
    for top in sorted(ROOT.iterdir()):
        if (
            top.is_dir()
            and top.name != "tests"
            and not top.name.startswith(".")
            and not (top / "pyvenv.cfg").exists()
        ):
            files += top.rglob("*.py")
    return files


def test_nothing_outside_tests_imports_tests():
    found = []
    files = _outside_tests()
    assert ROOT / "bench" / "pose_bench.py" in files
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            found += [
                f"{path.relative_to(ROOT)}: {n}" for n in names if n == "tests" or n.startswith("tests.")
            ]
    assert found == []
