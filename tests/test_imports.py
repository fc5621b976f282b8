"""The package's import graph, read from the source (nothing is imported): the layers only
import downwards, the FLOP formulas are a leaf, and no two modules import each other, directly
or through others (a lazy import inside a function counts: it is a dependency all the same)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"spcl_fast": ROOT / "spcl_fast", "spcl_fast.kernels": ROOT / "kernels"}


def _modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()


def _type_checking_only(node: ast.AST, parents: dict) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, path: Path) -> set[str]:
    """The spcl_fast modules that module ``name`` imports, anywhere in its body."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in MODULES and t != name}
    return out


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_the_graph_is_read():
    assert GRAPH["spcl_fast.train.engine"] >= {"spcl_fast.run.config", "spcl_fast.train.trainer"}
    assert "spcl_fast.flops" in GRAPH["spcl_fast.nn.vit"]


def test_eval_never_imports_train():
    bad = {(m, t) for m, ts in GRAPH.items() if _under(m, "spcl_fast.eval")
           for t in ts if _under(t, "spcl_fast.train")}
    assert not bad


@pytest.mark.parametrize("lower, upper", [
    ("spcl_fast.run", "spcl_fast.train"), ("spcl_fast.run", "spcl_fast.eval"),
    ("spcl_fast.methods", "spcl_fast.run"), ("spcl_fast.nn", "spcl_fast.methods"),
    ("spcl_fast.ops", "spcl_fast.nn"), ("spcl_fast.data", "spcl_fast.run"),
])
def test_layers_import_downwards(lower, upper):
    bad = {(m, t) for m, ts in GRAPH.items() if _under(m, lower) for t in ts if _under(t, upper)}
    assert not bad


def test_flop_formulas_are_a_leaf():
    assert GRAPH["spcl_fast.flops"] == set()


def test_no_import_circle():
    """Tarjan's strongly connected components: any with two or more modules is a circle."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                circles.append(sorted(component))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    assert not circles


def test_the_engine_knows_no_method_by_name():
    """Adding a method touches methods/ and its config section only: nothing in the training
    engine may branch on one."""
    names = {"spcl", "mae", "dino"}
    for name, path in MODULES.items():
        if not _under(name, "spcl_fast.train"):
            continue
        consts = {n.value for n in ast.walk(ast.parse(path.read_text()))
                  if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not consts & names, (name, consts & names)


def _method_modules() -> set[str]:
    """The modules of the classes in ``spcl_fast.methods.METHODS``, read from its source."""
    tree = ast.parse(MODULES["spcl_fast.methods"].read_text())
    where = {a.asname or a.name: f"spcl_fast.methods.{node.module}" for node in tree.body
             if isinstance(node, ast.ImportFrom) and node.level == 1 for a in node.names}
    registry = next(node.value for node in tree.body if isinstance(node, ast.AnnAssign)
                    and ast.unparse(node.target) == "METHODS")
    return {where[v.id] for v in registry.values}


def test_no_method_imports_another():
    """Methods are siblings: what two share (crops, heads, patches, loss terms) lives below
    them, so no method module reaches another one, directly or through others."""
    methods = _method_modules()
    assert methods == {f"spcl_fast.methods.{m}" for m in ("spcl", "mae", "dino", "simclr")}
    for method in methods:
        seen, todo = set(), [method]
        while todo:
            for dep in GRAPH[todo.pop()] - seen:
                seen.add(dep)
                todo.append(dep)
        assert not seen & (methods - {method}), (method, sorted(seen & methods))
