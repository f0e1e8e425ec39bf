"""The layers of docs/architecture.md, checked on the code: imports point down only, no module imports itself back
through others, and imports stay at module top (except the optional heavy dependencies named here)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "jaxfound"
# lowest first; a module may import its own package's modules on its layer, and any module of a lower layer
LAYERS = [
    ("jaxfound", "jaxfound.errors"),
    ("jaxfound.config", "jaxfound.metrics", "jaxfound.sharding", "jaxfound.checkpoint", "jaxfound.accelerators"),
    ("jaxfound.quant",),
    ("jaxfound.models",),
    ("jaxfound.data", "jaxfound.interop"),
    ("jaxfound.losses",),
    ("jaxfound.train.optim", "jaxfound.train.state", "jaxfound.train.step"),
    ("jaxfound.tasks",),
    ("jaxfound.runs",),
    ("jaxfound.train.build", "jaxfound.train.hooks", "jaxfound.train.loop"),
    ("jaxfound.fusion",),
    ("jaxfound.inference", "jaxfound.generation"),
    ("jaxfound.engine", "jaxfound.batcher"),
    ("jaxfound.app",),
    ("jaxfound.cli",),
]
# imports inside functions, each for a reason: grain (5 s to import here), datasets (3.5 s) and transformers (2.4 s)
# are paid only by the paths that use them (a GGUF's tokenizer is built by transformers); torch is optional (reading
# .bin checkpoints); libtpu (684 MB, the tpu extra) is loaded only to describe a TPU topology
LAZY = {("jaxfound.accelerators", "libtpu"),
        ("jaxfound.checkpoint", "grain"), ("jaxfound.data.finetune", "grain"), ("jaxfound.data.pipeline", "grain"),
        ("jaxfound.data.corpus", "datasets"), ("jaxfound.data.corpus", "pyarrow"),
        ("jaxfound.data.tokenizer", "transformers"),
        ("jaxfound.interop.hf", "torch"), ("jaxfound.interop.gguf", "transformers")}


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path):
    """(imported jaxfound module or top-level package, at module top?) for every import in the file."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            yield name, id(node) in top


def _graph() -> dict[str, set[str]]:
    """module -> the jaxfound modules it imports (`from jaxfound.x import y` counts y when y is a module)."""
    return {m: {n for n, _ in _imports(p) if n in MODULES and n != m} for m, p in MODULES.items()}


def layer(module: str) -> tuple[int, str]:
    """(layer index, the layer entry it falls under): the longest matching prefix."""
    best = max(((i, e) for i, entries in enumerate(LAYERS) for e in entries
                if module == e or module.startswith(e + ".")), key=lambda t: len(t[1]), default=None)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it (and to docs/architecture.md)")
    return best


def test_every_module_has_a_layer():
    for m in MODULES:
        layer(m)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down_the_layers(module):
    (i, entry), bad = layer(module), []
    for target in _graph()[module]:
        j, target_entry = layer(target)
        same_package = target_entry == entry or (j == i and target.rsplit(".", 1)[0] == module.rsplit(".", 1)[0])
        if j > i or (j == i and not same_package and entry != "jaxfound"):
            bad.append(f"{target} (layer {j})")
    assert not bad, f"{module} (layer {i}) imports upward or sideways: {', '.join(bad)}"


def test_no_import_cycles():
    graph, state, stack = _graph(), {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == "open":
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_imports_at_module_top():
    inside = sorted({(m, n.split(".")[0] if not n.startswith("jaxfound") else n)
                     for m, p in MODULES.items() for n, at_top in _imports(p) if not at_top})
    unexplained = [f"{m} imports {n} inside a function" for m, n in inside if (m, n) not in LAZY]
    assert not unexplained, "; ".join(unexplained)


def test_the_layer_check_catches_an_upward_import(tmp_path):
    """The checker itself: a model importing the run directory is reported."""
    assert layer("jaxfound.models.bert")[0] < layer("jaxfound.runs")[0] < layer("jaxfound.app.finetune")[0]
    assert layer("jaxfound.train.step")[0] < layer("jaxfound.tasks")[0] < layer("jaxfound.train.loop")[0]
