"""The package's layering, checked from the source: imports go downward only, no cycles, no private names.

Layers, lowest first (a module may import its own layer's modules and any lower layer's):
core < ops < data < views < models < methods < config < eval < engine < report < cli (and the top-level
fastmice/__init__, __main__, api, which re-export). The naive reference lives in bench/, not in the package.
"""
import ast
from pathlib import Path

import pytest

from tests.helpers import REPO

PACKAGE = REPO / "fastmice"
LAYERS = ["core", "ops", "data", "views", "models", "methods", "config", "eval", "engine", "report", "cli"]
TOP = {"__init__", "__main__", "api"}   # public entry points above every layer


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> int:
    parts = module.split(".")
    if len(parts) == 1:           # fastmice itself (its __init__)
        return len(LAYERS)
    head = parts[1]
    if head in TOP:
        return len(LAYERS)
    if head == "configs":          # the bundled YAML files' package
        return LAYERS.index("config")
    return LAYERS.index(head)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(module imported, names imported from it, line) for every fastmice import in the file, including those
    inside functions and under TYPE_CHECKING."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:   # relative import
                here = module_name(path)
                base = here.split(".")[: len(here.split(".")) - node.level + (path.name == "__init__.py")]
                mod = ".".join(base + ([mod] if mod else []))
            if mod.split(".")[0] == "fastmice":
                out.append((mod, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "fastmice":
                    out.append((a.name, [], node.lineno))
    return out


FILES = sorted(PACKAGE.rglob("*.py"))


def test_the_package_has_its_layers_as_folders():
    flat = sorted(p.stem for p in PACKAGE.glob("*.py"))
    assert set(flat) <= TOP | {"config", "cli"}, f"modules outside the layer folders: {flat}"
    for layer in LAYERS:
        assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file(), layer
    assert not (REPO / "kernels").exists(), "the Triton kernels live inside the package (fastmice/ops/kernels)"
    assert not (PACKAGE / "naive.py").exists(), "the naive reference is the benchmarks' (bench/naive.py)"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_go_downward_only(path):
    here = module_name(path)
    mine = layer_of(here)
    for mod, names, line in imports(path):
        target = mod
        # `from fastmice import distributed` names a submodule: its layer is the submodule's
        if mod == "fastmice" and names:
            target = f"fastmice.{names[0]}"
        assert layer_of(target) <= mine, (f"{path.relative_to(REPO)}:{line} imports {mod} "
                                          f"({LAYERS[layer_of(target)] if layer_of(target) < len(LAYERS) else 'top'})"
                                          f" from the lower layer {LAYERS[mine] if mine < len(LAYERS) else 'top'}")


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path):
    for mod, names, line in imports(path):
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        private += [p for p in mod.split(".") if p.startswith("_") and not p.startswith("__")]
        assert not private, f"{path.relative_to(REPO)}:{line} imports private {private} from {mod}"


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    known = {module_name(p) for p in FILES}
    for path in FILES:
        deps = set()
        for mod, names, _ in imports(path):
            for cand in [f"{mod}.{n}" for n in names] + [mod]:
                if cand in known:
                    deps.add(cand)
                    break
        graph[module_name(path)] = deps - {module_name(path)}

    # a package's __init__ importing its own submodules is how packages re-export: not a cycle
    def edges(m: str) -> set[str]:
        return {d for d in graph.get(m, ()) if not m.startswith(d + ".") and not d.startswith(m + ".")}

    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges(m)):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The rule above fails on a bad import (so a pass means something)."""
    bad = PACKAGE / "core" / "device.py"
    found = [(mod, names) for mod, names, _ in imports(bad)]
    assert all(layer_of(m if m != "fastmice" else f"fastmice.{n[0]}") <= layer_of("fastmice.core.device")
               for m, n in found)
    assert layer_of("fastmice.engine.trainer") > layer_of("fastmice.core.device")
    fake = tmp_path / "x.py"
    fake.write_text("from fastmice.engine.trainer import Trainer\nfrom fastmice.data.folder import _decode\n")
    got = [(m, n) for m, n, _ in imports(fake)]
    assert ("fastmice.engine.trainer", ["Trainer"]) in got and ("fastmice.data.folder", ["_decode"]) in got
