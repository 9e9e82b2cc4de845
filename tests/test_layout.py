"""The package's imports go one way, down the layers of ARCHITECTURE.md.

face -> estimators -> training drivers -> objectives -> Network -> kernels. Every import
of a fastbp module is read from the source with ``ast``, function-level ones included: a
module may import modules of its own layer or below, never above, and the imports form
no cycle. A function-level import is kept only for an optional dependency.
"""
import ast
import pathlib

import pytest

# The source tree beside these tests (the installed copy holds the same .py files).
ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "fastbp"

# Bottom first. Each module of the package sits in exactly one layer.
LAYERS = {
    "kernels": {"_core", "_version"},  # _core picks a compiled _kernels_* variant
    "runtime": {"_threads"},  # thread counts and BLAS limits, over _core
    "network": {"_network"},
    "objectives": {"_objective", "distributed"},
    "drivers": {"_divergence", "_solvers", "_hessian_free", "_stochastic"},
    "estimators": {"_validation", "_estimators", "_autoencoder"},
    "face": {"_config", "_io", "cli", "_bench", "_gradcheck", "_onnx",
             "inspection"},
    "package": {"__init__"},
}
RANK = {name: rank for rank, names in enumerate(LAYERS.values()) for name in names}
COMPILED_PREFIX = "_kernels_"  # the compiled variants sit in the kernels layer

# Third-party modules that are optional extras: the only ones imported inside functions.
OPTIONAL = {"dask", "distributed", "matplotlib", "torch", "onnx", "skl2onnx",
            "onnxruntime", "rich"}


def _rank(module):
    if module.startswith(COMPILED_PREFIX):
        return RANK["_core"]
    return RANK[module]


def imports(source, modules):
    """(line, imported fastbp module or None, top-level name, function-level?) for every
    import statement in ``source``, a module of the package; ``modules`` are the names
    of the package's modules (``from . import x`` names a module or the package)."""
    found = []

    def target(parts):
        """The package module named by dotted parts below ``fastbp``."""
        if not parts:
            return "__init__"
        return parts[0] if parts[0] in modules or parts[0].startswith(
            COMPILED_PREFIX) else "__init__"

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    parts = alias.name.split(".")
                    internal = target(parts[1:]) if parts[0] == "fastbp" else None
                    found.append((child.lineno, internal, parts[0], in_function))
            elif isinstance(child, ast.ImportFrom):
                parts = (child.module or "").split(".") if child.module else []
                if child.level > 1:
                    raise AssertionError(f"line {child.lineno}: relative import above the "
                                         "package")
                if child.level == 1 or parts[:1] == ["fastbp"]:
                    below = parts if child.level == 1 else parts[1:]
                    if below:
                        found.append((child.lineno, target(below), "fastbp", in_function))
                    else:  # from . import a, b: modules or names of the package
                        for alias in child.names:
                            found.append((child.lineno, target([alias.name]), "fastbp",
                                          in_function))
                else:
                    found.append((child.lineno, None, parts[0], in_function))
            visit(child, inside)

    visit(ast.parse(source), False)
    return found


def problems(sources):
    """Every upward import, cycle and function-level import of a non-optional module in
    ``sources`` ({module name: source text})."""
    modules = set(sources) | {"_core"}
    found, graph = [], {name: set() for name in sources}
    for name, source in sources.items():
        if name not in RANK:
            found.append(f"{name}: not placed in a layer (add it to LAYERS and to "
                         "ARCHITECTURE.md)")
            continue
        for line, internal, top, in_function in imports(source, modules):
            if internal is not None:
                if in_function:
                    found.append(f"{name}:{line}: function-level import of fastbp's "
                                 f"{internal} (import it at the top)")
                if internal not in RANK and not internal.startswith(COMPILED_PREFIX):
                    found.append(f"{name}:{line}: imports {internal}, which is in no layer")
                elif _rank(internal) > RANK[name]:
                    found.append(f"{name}:{line}: imports {internal}, a layer above it")
                if internal != name:
                    graph[name].add(internal)
            elif in_function and top not in OPTIONAL:
                found.append(f"{name}:{line}: function-level import of {top}, which is not "
                             "an optional dependency (import it at the top)")
    # Cycles, by depth-first search.
    state = {}

    def walk(node, path):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                found.append("import cycle: " + " -> ".join(cycle))
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            walk(node, [node])
    return found


def package_sources():
    return {path.stem: path.read_text() for path in sorted(PACKAGE.glob("*.py"))}


def test_every_layer_names_existing_modules():
    sources = package_sources()
    for layer, names in LAYERS.items():
        for name in names - {"_core"}:
            assert name in sources, f"{layer} lists {name}, which is not in the package"
    assert (PACKAGE / "_core.pyx").exists()


def test_imports_go_one_way_without_cycles():
    assert problems(package_sources()) == []


def test_the_checker_finds_upward_imports_cycles_and_hidden_imports():
    # The rules above must be able to fail: each kind of fault, planted in copies of
    # the real sources, is reported.
    sources = package_sources()
    upward = dict(sources, _network=sources["_network"] + "\nfrom ._estimators import X\n")
    assert any("_network" in p and "a layer above" in p for p in problems(upward))

    hidden = dict(sources, _solvers=sources["_solvers"]
                  + "\ndef f():\n    from ._hessian_free import fit_hessian_free\n")
    found = problems(hidden)
    assert any("function-level import of fastbp's _hessian_free" in p for p in found)

    cycle = dict(sources, _hessian_free=sources["_hessian_free"]
                 + "\ndef g():\n    from . import _solvers\n",
                 _solvers=sources["_solvers"] + "\nfrom . import _hessian_free\n")
    assert any(p.startswith("import cycle:") and "_solvers" in p and "_hessian_free" in p
               for p in problems(cycle))

    required = dict(sources, cli=sources["cli"] + "\ndef h():\n    import sklearn\n")
    assert any("function-level import of sklearn" in p for p in problems(required))
    optional = dict(sources, cli=sources["cli"] + "\ndef h():\n    import matplotlib\n")
    assert problems(optional) == []

    unplaced = dict(sources, _new_module="import numpy\n")
    assert any("_new_module: not placed" in p for p in problems(unplaced))

    package = dict(sources, _estimators=sources["_estimators"] + "\nimport fastbp\n")
    assert any("_estimators" in p and "__init__" in p for p in problems(package))


@pytest.mark.parametrize("line, expected", [
    ("from . import _network", "_network"),
    ("from .distributed import DaskObjective", "distributed"),
    ("import fastbp._threads", "_threads"),
    ("from fastbp import MLPClassifier", "__init__"),
    ("from . import _kernels_avx2", "_kernels_avx2"),
])
def test_imports_are_resolved_to_package_modules(line, expected):
    found = imports(line + "\n", {"_network", "distributed", "_threads"})
    assert [f[1] for f in found] == [expected]


def test_architecture_map_names_every_module():
    text = (ROOT / "ARCHITECTURE.md").read_text()
    for names in LAYERS.values():
        for name in names:
            shown = "__init__.py" if name == "__init__" else name
            assert shown in text, f"ARCHITECTURE.md does not mention {shown}"
