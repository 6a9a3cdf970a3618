"""helpers/ as packages by stage (ARCHITECTURE.md): small modules, small packages, imports in one direction only.

The imports are read from the source (every `from .x import y`, in functions too), not from an import at run time,
so a lazy import that would close a cycle counts as well.
"""
import ast
import re
from pathlib import Path

from conftest import ROOT

HELPERS = ROOT / "helpers"
MAX_TOP_LEVEL, MAX_PER_PACKAGE, MAX_LINES = 8, 10, 330


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The helpers modules one file imports, relative imports resolved against its package."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def graph() -> dict[str, set[str]]:
    paths = {module_name(p): p for p in HELPERS.rglob("*.py")}
    return {name: imported_modules(path, set(paths)) for name, path in paths.items()}


def cycle(edges: dict[str, set[str]]) -> list[str]:
    """One cycle of the graph, or []: a depth-first search that meets a node still on its path."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return []


def package_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (HELPERS / parts[1]).is_dir()) else None


def test_no_import_cycle_between_modules():
    assert cycle(graph()) == []


def test_packages_import_each_other_in_one_direction():
    edges = {}
    for module, imports in graph().items():
        source = package_of(module)
        if source is None:
            continue  # the commands at the top import every package
        edges.setdefault(source, set()).update(p for p in map(package_of, imports) if p not in (None, source))
        assert all(package_of(m) is not None for m in imports), f"{module} imports a top-level module"
    assert cycle(edges) == []


def test_sizes():
    top = [p.name for p in HELPERS.glob("*.py")]
    assert len(top) <= MAX_TOP_LEVEL, top
    packages = [p for p in HELPERS.iterdir() if (p / "__init__.py").exists()]
    assert 4 <= len(packages) <= 10
    for package in packages:
        modules = [p for p in package.glob("*.py") if p.name != "__init__.py"]
        assert len(modules) <= MAX_PER_PACKAGE, package.name
        assert ast.get_docstring(ast.parse((package / "__init__.py").read_text())), f"{package.name}: no docstring"
    long = {str(p.relative_to(ROOT)): n for p in HELPERS.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long


def test_architecture_md_maps_every_package_and_what_it_may_import():
    """ARCHITECTURE.md's package table: one row per package, naming the packages it may import; the code keeps to it."""
    rows = re.findall(r"^\| `(\w+)/` \| (.*?) \| (.*?) \|$", (ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"),
                      re.M)
    allowed = {name: set(re.findall(r"`(\w+)`", may)) for name, _, may in rows}
    packages = {p.name for p in HELPERS.iterdir() if (p / "__init__.py").exists()}
    assert set(allowed) == packages
    for module, imports in graph().items():
        source = package_of(module)
        if source is not None:
            used = {package_of(m) for m in imports} - {source}
            assert used <= allowed[source], f"{module} imports {sorted(used - allowed[source])}"
