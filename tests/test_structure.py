"""The package's shape: no import circles between rtdp's modules, a light core, no oversized files."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "rtdp"


def _module_name(path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _top_level_imports(path, modules: set[str]) -> set[str]:
    """rtdp modules a module imports when it is imported (module-level statements; imports inside functions run
    later and are how rtdp keeps heavy or circular dependencies lazy)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    out: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:  # a name imported from a module is an attribute of it
            name = name.rpartition(".")[0]
        if name and name != me:
            out.add(name)

    def visit(nodes) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    add(f"{base}.{alias.name}")
            elif isinstance(node, (ast.If, ast.Try)):
                if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                    continue
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return out


def import_graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {m: _top_level_imports(p, set(files)) for m, p in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None; a package importing its own submodules is not one."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for dep in sorted(graph.get(m, ())):
            if m.startswith(dep + "."):  # a submodule's import of its parent package runs the package first
                continue
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                found = dfs(dep)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = dfs(m)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_rtdp():
    graph = import_graph()
    assert "rtdp.policies.registry" in graph and graph["rtdp.policies.base"] >= {"rtdp.models.base"}
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_import_rtdp_core_loads_torch_and_nothing_else_heavy():
    """What ``import rtdp.core`` loads beyond ``import torch``: its own modules, rtdp.errors and the standard library."""
    code = ("import sys; import torch; before = set(sys.modules); import rtdp.core; "
            "new = sorted({m.split('.')[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names)); "
            "print(new); print(sorted(m for m in sys.modules if m.startswith('rtdp.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    new, rtdp_modules = out.splitlines()
    assert new == "['rtdp']", f"import rtdp.core pulled in packages beyond torch: {new}"
    loaded = eval(rtdp_modules)  # a printed list of strings
    assert loaded and all(m.startswith(("rtdp.core", "rtdp.errors")) for m in loaded), loaded


def test_no_file_in_rtdp_over_600_lines():
    long = {str(p.relative_to(REPO)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"files over 600 lines: {long}"
