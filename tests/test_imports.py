"""The shape of the package, read from its import statements (parsed with `ast`, nothing imported):

- the command line is the top layer: no module of ggfwd outside `ggfwd/cli/` imports `ggfwd.cli` (the one
  exception is `ggfwd/__main__.py`, which is `python -m ggfwd`, i.e. the command line itself);
- there are no import cycles among ggfwd's modules.

Both module-level imports and imports deferred into function bodies count. A deferred import still ties the
two modules together: deferring it only hides the cycle from Python's import machinery (and from the reader
until that function runs), so a cycle through a function body is a cycle here too. Relative imports are
resolved against the importing module's package; `from package import name` counts as an import of the
submodule `package.name` when such a module exists, else of `package`. The implicit import of a module's
parent packages is not an edge: a package's `__init__` naturally imports the modules under it.

The installed package maps the folder `convert/` to `ggfwd.convert` (pyproject's package-dir), so its modules
are checked under that name.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {"ggfwd": ROOT / "ggfwd", "ggfwd.convert": ROOT / "convert"}  # package -> folder, as in pyproject
ENTRY_POINTS = {"ggfwd.__main__"}  # `python -m ggfwd`: part of the command line


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package's __init__)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = [*package.split("."), *path.relative_to(folder).with_suffix("").parts]
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imports(known: dict[str, tuple[Path, bool]]) -> dict[str, list[tuple[str, int, bool]]]:
    """Module -> [(ggfwd module it imports, line, deferred into a function)], every import statement counted."""
    edges: dict[str, list[tuple[str, int, bool]]] = {}

    def owner(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for module, (path, is_package) in known.items():
        package = module.split(".") if is_package else module.split(".")[:-1]
        found = edges.setdefault(module, [])

        def visit(node: ast.AST, deferred: bool) -> None:
            for child in ast.iter_child_nodes(node):
                inner = deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                targets = []
                if isinstance(child, ast.Import):
                    targets = [a.name for a in child.names]
                elif isinstance(child, ast.ImportFrom):
                    if child.level:
                        base = package[: len(package) - (child.level - 1)]
                        assert base, f"{path}:{child.lineno}: relative import climbs out of the package"
                        base = ".".join(base + ([child.module] if child.module else []))
                    else:
                        base = child.module or ""
                    targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in child.names]
                for target in targets:
                    if target == "ggfwd" or target.startswith("ggfwd."):
                        hit = owner(target)
                        assert hit is not None, f"{path}:{child.lineno}: imports {target}, which is no module here"
                        if hit != module:
                            found.append((hit, child.lineno, inner))
                visit(child, inner)

        visit(ast.parse(path.read_text(encoding="utf-8"), str(path)), False)
    return edges


def find_cycle(edges: dict[str, list[tuple[str, int, bool]]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    graph = {m: sorted({t for t, _, _ in e}) for m, e in edges.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in graph.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def describe(cycle: list[str], edges) -> str:
    steps = []
    for a, b in zip(cycle, cycle[1:]):
        line, deferred = next((ln, d) for t, ln, d in edges[a] if t == b)
        steps.append(f"{a} -> {b} (line {line}{', in a function' if deferred else ''})")
    return "; ".join(steps)


def test_the_parser_sees_the_package():
    """Guards the guards: the parse finds the modules, resolves relative imports and sees deferred ones."""
    known = modules()
    assert {"ggfwd.cli", "ggfwd.cli.train", "ggfwd.federation.node", "ggfwd.convert.build"} <= set(known)
    assert '"ggfwd.convert" = "convert"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    edges = imports(known)
    assert ("ggfwd.errors", False) in {(t, d) for t, _, d in edges["ggfwd.cli"]}  # at module level
    assert ("ggfwd.cli.train", True) in {(t, d) for t, _, d in edges["ggfwd.cli"]}  # in _register()
    assert "ggfwd.errors" in {t for t, _, _ in edges["ggfwd.session"]}  # `from .errors import UserError`
    assert "ggfwd.sampling" in {t for t, _, _ in edges["ggfwd.federation.client"]}  # `from .. import sampling`
    assert find_cycle({"a": [("b", 1, False)], "b": [("c", 2, True)], "c": [("a", 3, False)]}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": [("b", 1, False)], "b": []}) is None


def test_only_the_command_line_imports_the_command_line():
    def in_cli(module: str) -> bool:
        return module == "ggfwd.cli" or module.startswith("ggfwd.cli.")

    edges = imports(modules())
    wrong = [f"{m} imports {t} (line {line})" for m, found in sorted(edges.items()) for t, line, _ in found
             if in_cli(t) and not in_cli(m) and m not in ENTRY_POINTS]
    assert not wrong, "the library reaches up into the command line: " + "; ".join(wrong)


def test_no_import_cycles():
    edges = imports(modules())
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + describe(cycle, edges)
