"""The layout a reader relies on: which module may import which (README, "Read the code")."""
import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(ROOT, "*.py"))}


def imports():
    """{module: the project modules it imports anywhere in its file (top level or in a function)}."""
    graph = {}
    for m in MODULES:
        deps = set()
        for node in ast.walk(ast.parse(open(os.path.join(ROOT, m + ".py")).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name in MODULES}
            elif isinstance(node, ast.ImportFrom) and node.module in MODULES:
                deps.add(node.module)
        graph[m] = deps - {m}
    return graph


def test_no_module_imports_one_that_imports_it_back():
    graph = imports()
    assert "prime_mini" in graph and "config" in graph["prime_mini"], "the scan sees the project's imports"

    def reach(m, seen):
        for d in graph[m]:
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen
    circles = sorted(m for m in graph if m in reach(m, set()))
    assert not circles, f"modules on an import circle: {circles} ({ {m: sorted(graph[m]) for m in circles} })"


def test_only_the_entry_points_import_the_loop_and_the_math_imports_no_project_module():
    graph = imports()
    importers = sorted(m for m, deps in graph.items() if "prime_mini" in deps)
    assert importers == ["bench"], f"only bench.py (which times the loop) may import prime_mini.py, not {importers}"
    for pure in ("prm", "rl", "verifiers"):
        assert graph[pure] <= {"sandbox"}, f"{pure}.py is pure math or string checking; it imports {sorted(graph[pure])}"
