"""The layers of diagnet: imports only go down.

Every module of ``diagnet/`` (and of ``models/``, installed as ``diagnet.models``) belongs to
one *unit*: a top-level module (``diagnet.autograd``) or a subpackage (``diagnet.nn``). The
units form layers, lowest first; a unit may import units of lower layers only, never one of
its own layer nor one above. So a reader can learn the framework bottom up, and no import
cycle can form between units::

    version, settings, checks      facts read once: the version, the environment, argument checks
    backend, config, random,       arrays and devices, grad mode, seeded generators; the C
      heap, jit                      heap; how the CPU kernels are compiled
    autograd                       Tensor and Function: the engine
    cuda_launch                    launching CUDA kernels (arrays only)
    diag                           the diagonal kernels: reference, CPU, CUDA, dispatch
    fused, sparse                  fused kernels (GELU, softmax, ...); the DiagMatrix format
    ops                            differentiable operations, built on the kernels
    functional, gradcheck,         ops under their public names; gradient checks; gradient
      clip, row_state                clipping and the parameter <-> optimizer protocol, which
                                     nn and optim share
    nn, optim                      side by side: neither imports the other
    tensorfile                     safetensors files and atomic writes
    skeleton                       state dicts split into tensors and JSON
    checkpoint                     whole training runs in one file
    data, dst                      data sets and loaders; dynamic sparse training
    distributed                    data-parallel training over MPI and NCCL
    train, plots                   the Trainer and its log; plots of the log
    diagnet                        the package root, which imports everything above
    models                         models built on the public API (the root included)

The middle (``cuda_launch`` to ``gradcheck``) is one layer in the design notes ("ops, diag,
sparse"); it is split here so that its inner order is enforced too: kernels work on arrays
and know nothing of autograd's ops, and the ops call the kernels. A module that is not in a
known unit fails the test until it is given a place in `LAYERS`.

Imports inside functions count as much as those at the top: a lazy import that runs up the
layers is still a cycle, only hidden. Within a unit, modules may import each other, but not
in a cycle. And no module imports a private name (``_name``) or a private module from
another unit: what a unit offers the others is its public names.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]

#: the units, lowest layer first; the units of one layer are side by side
LAYERS = (
    ("version", "settings", "checks"),
    ("backend", "config", "random", "heap", "jit"),
    ("autograd",),
    ("cuda_launch",),
    ("diag",),
    ("fused", "sparse"),
    ("ops",),
    ("functional", "gradcheck", "clip", "row_state"),
    ("nn", "optim"),
    ("tensorfile",),
    ("skeleton",),
    ("checkpoint",),
    ("data", "dst"),
    ("distributed",),
    ("train", "plots"),
    ("",),            # the package root, diagnet/__init__.py
    ("models",),
)
LAYER_OF = {unit: number for number, units in enumerate(LAYERS) for unit in units}
#: the source folders of the installed package (models/ installs as diagnet.models)
SOURCES = {"diagnet": ROOT / "diagnet", "diagnet.models": ROOT / "models"}


def modules() -> dict:
    """Every module's dotted name -> its file (a package is its ``__init__.py``)."""
    found = {}
    for package, folder in SOURCES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def unit(module: str) -> str:
    """The unit of a dotted name: ``diagnet.nn.linear`` -> ``nn``; the root is ``""``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imports(module: str, path: pathlib.Path, known) -> list:
    """``(line, target module, imported name or None)`` for each import of a diagnet module
    in ``path``, function-level ones included, relative imports resolved. ``from a import b``
    imports the module ``a.b`` when there is one, else the name ``b`` of ``a``."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub, None) if sub in known
                             else (node.lineno, base, alias.name))
    return [(line, target, name) for line, target, name in found
            if target == "diagnet" or target.startswith("diagnet.")]


def edges():
    """Every import between diagnet modules: ``(module, file, line, target, name)``."""
    known = modules()
    return [(module, path, line, target, name) for module, path in known.items()
            for line, target, name in imports(module, path, known)]


def where(path, line) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


def test_every_module_has_a_layer():
    missing = sorted({f"{unit(module)!r} ({path.relative_to(ROOT)})"
                      for module, path in modules().items() if unit(module) not in LAYER_OF})
    assert not missing, f"units without a place in LAYERS: {', '.join(missing)}"


def test_imports_only_go_down():
    problems = []
    for module, path, line, target, _ in edges():
        source, dest = unit(module), unit(target)
        if source == dest or source not in LAYER_OF or dest not in LAYER_OF:
            continue
        low, high = LAYER_OF[source], LAYER_OF[dest]
        if high > low:
            why = f"{dest or 'the package root'} is above {source or 'the package root'}"
        elif high == low:
            why = f"{source} and {dest} are side by side"
        else:
            continue
        problems.append(f"{where(path, line)}: {module} imports {target}: {why}")
    assert not problems, "imports that run up the layers:\n" + "\n".join(sorted(problems))


def test_no_import_cycle_within_a_unit():
    graph = {}
    known = modules()
    for module, _, _, target, _ in edges():
        if target in known and target != module and unit(target) == unit(module):
            graph.setdefault(module, set()).add(target)
    cycles = []
    state = {}  # module -> "open" while on the walk's path, "done" after

    def walk(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                walk(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            walk(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_no_private_import_from_another_unit():
    problems = []
    for module, path, line, target, name in edges():
        if unit(target) == unit(module):
            continue
        private = [part for part in target.split(".") if part.startswith("_")]
        if name is not None and name.startswith("_") and not name.startswith("__"):
            private.append(name)
        if private:
            problems.append(f"{where(path, line)}: {module} imports {', '.join(private)} "
                            f"from {target}")
    assert not problems, "private names used across units:\n" + "\n".join(sorted(problems))
