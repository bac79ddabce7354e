"""The package's import graph runs one way: config -> data -> models -> train / eval / predict -> demo / cli.

Parsed from the source (every import statement, also those inside functions), not by importing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import larvseg

PACKAGE = Path(larvseg.__file__).resolve().parent

# module prefix -> layer (longest prefix wins); a module may import modules of a lower layer, and of its
# own layer only inside its own unit (larvseg.train may import larvseg.train.*, not larvseg.eval.*)
LAYERS = {
    "larvseg": 0,  # larvseg/__init__.py
    "larvseg.errors": 0,
    "larvseg.atomic": 0,
    "larvseg.cache_dir": 0,
    "larvseg.domains": 0,  # what each config key and option allows (imported by config and cli)
    "larvseg.config": 0,
    "larvseg.distributed": 0,
    "larvseg.precision": 0,  # amp choice: imports only torch and config
    "larvseg.threads": 0,  # intra-op thread count: imports only torch
    "larvseg.log": 0,  # the console handler of the larvseg logger (set up by entry points): imports only larvseg.progress
    "larvseg.tensorboard": 0,  # TensorBoard event files (training's logger and `larvseg eval`): numpy + tensorboardX
    "larvseg.data": 1,
    "larvseg.models": 2,
    "larvseg.train": 3,
    "larvseg.eval": 3,
    "larvseg.predict": 3,
    "larvseg.demo": 4,
    "larvseg.serve": 4,
    "larvseg.export": 4,
    "larvseg.hub": 4,  # `larvseg hub save/push`
    "larvseg.cli": 4,
    "larvseg.reproductions": 4,  # the original-configs table: reads configs through the data layer
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from larvseg.data import io` imports the module larvseg.data.io
            out.update(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base for a in node.names)
    return {m for m in out if m == "larvseg" or m.startswith("larvseg.")}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _prefix(name: str, table) -> str:
    return max((p for p in table if name == p or name.startswith(p + ".")), key=len)


def layer(name: str) -> int:
    return LAYERS[_prefix(name, LAYERS)]


def top(name: str) -> str:
    """The unit of the layer table a module belongs to (larvseg.data, larvseg.predict, ...)."""
    return _prefix(name, LAYERS)


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def violations(edges: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in edges.items():
        for dst in sorted(targets):
            if layer(dst) > layer(src):
                bad.append(f"{src} imports {dst} (layer {layer(dst)} above {layer(src)})")
            elif layer(dst) == layer(src) and top(dst) != top(src) and layer(src) > 0:
                bad.append(f"{src} imports {dst} (same layer, another unit)")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if nxt not in edges:
                continue
            if state.get(nxt) == 1:
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    return found


def test_import_graph_runs_one_way():
    edges = graph()
    assert "larvseg.models.segmenter" in edges and "larvseg.data.vocabulary" in edges  # the parser sees the tree
    assert "larvseg.models.segmenter" in edges["larvseg.predict"]
    assert violations(edges) == []
    assert cycles(edges) == []


def test_nothing_imports_the_predict_command():
    edges = graph()
    # only the applications on top of it (the CLI, the web page, the ONNX export) use the predict command
    users = {m for m, targets in edges.items() if "larvseg.predict" in targets}
    assert users <= {"larvseg.cli", "larvseg.serve", "larvseg.export"}


def test_the_checker_catches_upward_and_sideways_imports():
    assert violations({"larvseg.data.mixing": {"larvseg.models.segmenter"}})  # upward
    assert violations({"larvseg.eval.evaluate": {"larvseg.predict"}})  # sideways, not allowed
    assert violations({"larvseg.eval.evaluate": {"larvseg.train.checkpoint"}})  # sideways: no exceptions
    assert violations({"larvseg.train.loop": {"larvseg.eval.evaluate"}})
    assert not violations({"larvseg.eval.evaluate": {"larvseg.models.inference", "larvseg.eval.confusion"}})
    assert cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
