"""The layout holds: pymoe/*.py is the library and pymoe/cli/ its users (no
library module imports the commands), no import cycle among pymoe's modules,
and no C file of the library calls back into a file that calls it. Read from
the source with ast and the C text, so that it fails on the change that
breaks it, whatever the tests import."""
import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "pymoe"
ENTRY_POINTS = {"pymoe.__main__"}  # `python -m pymoe` runs the commands: a user, like pymoe/cli/


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set:
    """pymoe modules that module `name` imports, at any depth in the file (function-level imports count, and
    those under `if TYPE_CHECKING:`: a cycle of imports for annotations is one for the reader and the type
    checker too)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def visit(node):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "pymoe")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "pymoe":
                for alias in node.names:  # `from . import errors` imports the module pymoe.errors
                    sub = f"{target}.{alias.name}"
                    found.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return {m for m in found if m in MODULES}


GRAPH = {name: imports_of(name) for name in MODULES}


def find_cycle(graph: dict):
    """One cycle as a list of nodes, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_reader_sees_the_imports_it_must():
    # a reader that found nothing would make the tests below pass vacuously
    assert "pymoe.cli.common" in GRAPH["pymoe.cli.generate"]
    assert "pymoe.errors" in GRAPH["pymoe._native"]
    assert "pymoe.session" in GRAPH["pymoe.model"]
    assert "pymoe.model" not in GRAPH["pymoe.session"]  # a session is given its model: it never imports it
    assert "pymoe.cli" in GRAPH["pymoe.__main__"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_library_module_imports_the_commands():
    library = [m for m in GRAPH if not m.startswith("pymoe.cli") and m not in ENTRY_POINTS]
    assert len(library) >= 15
    offenders = {m: sorted(i for i in GRAPH[m] if i.startswith("pymoe.cli")) for m in library}
    assert not {m: i for m, i in offenders.items() if i}, "the library imports its commands"


def test_no_import_cycle_among_pymoe_modules():
    assert find_cycle(GRAPH) is None


# ---- C: which file's functions each file calls ------------------------------------------------------------------

C_FILES = sorted((REPO / "csrc").glob("*.c"))
DEFINITION = re.compile(r"^(?!static\b)[A-Za-z_][\w \t\*]*?\b(pymoe_\w+)\s*\([^;]*?\)\s*\{", re.M | re.S)
CALL = re.compile(r"\b(pymoe_\w+)\s*\(")


def _code(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def c_call_graph() -> dict:
    code = {p.name: _code(p) for p in C_FILES}
    defined = {fn: name for name, text in code.items() for fn in DEFINITION.findall(text)}
    return {name: {defined[fn] for fn in CALL.findall(text) if fn in defined and defined[fn] != name}
            for name, text in code.items()}


def test_no_c_file_calls_back_into_a_caller():
    graph = c_call_graph()
    assert "session.c" in graph["speculative.c"] and "gguf_file.c" in graph["memory.c"]  # the reader sees calls
    assert find_cycle(graph) is None


@pytest.mark.parametrize("name", ["library.c", "gguf_file.c"])
def test_the_start_up_and_the_gguf_reader_depend_on_no_other_part(name):
    assert c_call_graph()[name] <= {"errors.c", "library.c"}
