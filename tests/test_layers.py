"""The three layers of docs/layout.md: each module imports only from its own layer or the ones below, the
library never imports the command line or the applications, and no file grows past a readable size."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "sundae"
METHOD = {"vqgan", "losses", "hourglass", "conditioning", "sundae", "text"}
APPS = ("cli", "apps")


def _module(path: Path) -> str:
    return ".".join(path.relative_to(SRC.parent).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every sundae module `path` imports, at any depth of the file (lazy imports count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sundae":
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "sundae"}
    modules = {_module(p) for p in SRC.rglob("*.py")}
    return {name for name in found if name in modules}


def _layer(module: str) -> int:
    part = module.split(".")[1] if "." in module else ""
    return 0 if part in METHOD else 2 if part in APPS or part == "__main__" else 1


def test_each_layer_imports_only_from_below_or_itself():
    wrong = []
    for path in SRC.rglob("*.py"):
        module = _module(path)
        if module == "sundae":  # the public API re-exports the layers
            continue
        wrong += [f"{module} -> {name}" for name in _imports(path) if _layer(name) > _layer(module)]
    assert wrong == []


def test_no_import_cycles():
    graph = {_module(p): {n for n in _imports(p) if n not in ("sundae", _module(p))} for p in SRC.rglob("*.py")}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, set())):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            assert visit(node, []) is None


def test_files_stay_readable():
    sizes = {str(p.relative_to(SRC)): len(p.read_text().splitlines()) for p in SRC.rglob("*.py")}
    assert {k: v for k, v in sizes.items() if v > 500} == {}
    assert {k: v for k, v in sizes.items() if k.startswith("cli/") and v > 300} == {}
