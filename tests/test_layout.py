"""The shape of the code a reader meets: the project's modules import each other without a circle (lazy imports
inside functions included), so each one can be read, and copied, after the ones it uses."""

import ast
from conftest import ROOT

MODULE_DIRS = (ROOT, ROOT / "benchmarks")


def project_imports() -> dict[str, set[str]]:
    """module name -> the project modules it imports anywhere in its text (top level or inside a function)."""
    files = {p.stem: p for d in MODULE_DIRS for p in sorted(d.glob("*.py"))}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
        graph[name] = {m for m in found if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle as [a, b, ..., a], or [] if there is none (depth-first search)."""
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_the_cycle_finder_finds_a_circle_and_only_a_circle():
    assert find_cycle({"common": {"demo_making"}, "demo_making": {"bookkeeping"}, "bookkeeping": {"common"}}) == [
        "bookkeeping", "common", "demo_making", "bookkeeping"]
    assert find_cycle({"rfcl": {"common", "vector_env"}, "vector_env": {"common"}, "common": set()}) == []


def test_the_project_modules_import_each_other_without_a_circle():
    graph = project_imports()
    assert {"rfcl", "rlpd", "common", "vector_env", "run_files", "run_flags", "run_log"} <= set(graph)
    assert "common" in graph["rfcl"]  # the reader sees imports at all
    cycle = find_cycle(graph)
    assert not cycle, f"import circle: {' -> '.join(cycle)}"
