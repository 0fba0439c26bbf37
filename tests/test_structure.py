"""The package's shape: imports point one way (api -> ops -> backends -> config/common), no cycle, no backend
importing the other, no library file over 450 lines."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ls_kernels")
MAX_LINES = 450
# what each layer may import from the package (module name prefixes, relative to ls_kernels)
ALLOWED = {
    "config": set(),
    "common": {"config"},
    "cache": {"config"},
    "checks": {"config", "cache", "checks"},
    "torch_backend": {"config", "common", "cache", "torch_backend"},
    "triton_backend": {"config", "common", "cache", "triton_backend"},
    "ops": {"config", "common", "cache", "torch_backend", "triton_backend"},
    "vision_ops": {"config", "common", "cache", "torch_backend", "triton_backend", "ops"},
    "api": {"config", "common", "cache", "checks", "ops", "vision_ops", "torch_backend"},
    "distributed": {"config", "common", "checks", "ops", "torch_backend"},
    "layer": {"config", "common", "cache", "checks", "api", "distributed"},
    "layer2d": {"config", "common", "checks", "api"},
    "__init__": {"api", "cache", "layer", "layer2d"},
}


def _modules():
    """{module name relative to the package: path}."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PACKAGE)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = os.path.join(root, f)
    return out


def _imports(name, path):
    """Package modules that `name` imports (resolved, relative to the package)."""
    is_pkg = path.endswith("__init__.py")
    parts = name.split(".") if name != "__init__" else []
    base = parts if is_pkg else parts[:-1]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.split(".")[0] == "ls_kernels":
                    found.add(".".join(node.module.split(".")[1:]))
                continue
            anchor = base[:len(base) - (node.level - 1)] if node.level > 1 else base
            target = anchor + (node.module.split(".") if node.module else [])
            if node.module:
                found.add(".".join(target))
            else:  # from . import a, b
                found.update(".".join(target + [a.name]) for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(".".join(a.name.split(".")[1:]) for a in node.names if a.name.startswith("ls_kernels."))
    return {m for m in found if m}


GRAPH = {name: _imports(name, path) for name, path in _modules().items()}


def _layer(name):
    return name.split(".")[0]


def test_every_module_has_a_layer():
    assert {_layer(m) for m in GRAPH} <= set(ALLOWED), sorted({_layer(m) for m in GRAPH} - set(ALLOWED))


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_imports_point_down(module):
    """A module imports only the layers below its own (a backend never imports the other backend)."""
    bad = {m for m in GRAPH[module] if _layer(m) not in ALLOWED[_layer(module)]}
    assert not bad, f"{module} imports {sorted(bad)}"


def test_no_import_cycle():
    known = {m for m in GRAPH}

    def resolve(m):  # "triton_backend.launch" or a name inside a module -> the module
        while m and m not in known:
            m = m.rpartition(".")[0]
        return m

    edges = {m: {resolve(t) for t in ts} - {None, ""} for m, ts in GRAPH.items()}
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for t in sorted(edges[m] - {m}):
            visit(t, path + [m])
        state[m] = "done"

    for m in sorted(edges):
        visit(m, [])


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_library_files_are_short(module):
    path = _modules()[module]
    n = sum(1 for _ in open(path))
    assert n <= MAX_LINES, f"{path}: {n} lines"
