"""The house rules that keep the layout honest: who may import what, no cycles, a loud CLI.

- memory/ owns persistence: no module outside it imports the tables or writes SQL through them;
- patching/ never imports daemon/, memory/ never imports daemon/ or patching/;
- no import cycle between modules (module-level, lazy and TYPE_CHECKING imports all count);
- the daemon's service never loads the evaluation harness (nor matplotlib) and `patchd --help`
  never loads torch;
- a command module that fails to import makes `patchd` fail, it is never skipped.
"""

from __future__ import annotations

import ast
import functools
import gc
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("daemon", "patching", "memory")
# memory/'s internals: the tables and the SQL built on them
MEMORY_INTERNALS = ("memory.schema", "memory.ingest", "memory.policy", "memory.summary", "memory.bulk")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


@functools.cache
def _imports() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its body (resolved to module names).

    Parsed once per session, with the garbage collector off: CPython 3.11 (before 3.11.9) keeps
    one AST recursion counter per interpreter, and a finalizer run by a collection in the middle
    of ast.parse that formats a traceback (which parses too, since 3.11) makes it fail with
    "AST constructor recursion depth mismatch" (seen once in CI, with a test's threads still
    winding down)."""
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = defaultdict(set)
    enabled = gc.isenabled()
    gc.disable()
    try:
        trees = {module: ast.parse(path.read_text()) for module, path in modules.items()}
    finally:
        if enabled:
            gc.enable()
    for module, tree in trees.items():
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                target = resolve(name) if name.split(".")[0] in PACKAGES else None
                if target and target != module:
                    graph[module].add(target)
    return graph


def test_only_memory_touches_the_tables() -> None:
    graph = _imports()
    offenders = {
        m: sorted(t for t in targets if t in MEMORY_INTERNALS)
        for m, targets in graph.items()
        if not m.startswith("memory")
    }
    assert {m: t for m, t in offenders.items() if t} == {}


def test_package_dependencies_point_one_way() -> None:
    graph = _imports()
    wrong = sorted(
        (m, t)
        for m, targets in graph.items()
        for t in targets
        if (m.startswith("patching") and t.startswith("daemon"))
        or (m.startswith("memory") and t.split(".")[0] in ("daemon", "patching"))
    )
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = _imports()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in _modules():
        if module not in index:
            visit(module)
    # a package's __init__ importing its own submodules is not a cycle of two rooms
    cycles = [c for c in cycles if not all(m.startswith(c[0]) for m in c)]
    assert cycles == []


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_service_loads_no_evaluation_code_and_help_loads_no_torch() -> None:
    done = _python(
        "import sys, daemon.service, daemon.history\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('patching.eval', 'matplotlib')))\n"
        "assert not bad, bad\n"
        "from daemon.cli import build_parser\n"
        "build_parser()\n"
    )
    assert done.returncode == 0, done.stderr
    done = _python("import sys\nfrom daemon.cli import build_parser\nbuild_parser()\nassert 'torch' not in sys.modules")
    assert done.returncode == 0, done.stderr


def test_a_command_module_that_fails_to_import_fails_patchd() -> None:
    # a command module missing from the install: the very error the old loader skipped in silence
    done = _python("import sys\nsys.modules['daemon.cli.mend'] = None\nfrom daemon.cli import main\nmain(['--help'])")
    assert done.returncode != 0
    assert "ModuleNotFoundError" in done.stderr and "daemon.cli.mend" in done.stderr
