"""The package's layering, checked from its source: the per-worker entry loads no Ray, only
raytitan/ray/ imports Ray, and no two modules of the package import each other (directly or
round a longer loop), counting imports inside functions too."""

from __future__ import annotations

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "raytitan"
RAY_LAYER = PACKAGE / "ray"


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, at module level or inside functions;
    relative imports resolved to absolute module names."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((node.lineno, module, [alias.name for alias in node.names]))
    return found


def loaded_by(modules: list[str], prefixes: tuple[str, ...]) -> list[str]:
    """The modules under ``prefixes`` that a fresh interpreter has loaded after importing ``modules``."""
    code = (f"import json, sys, {', '.join(modules)}; "
            f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter imports torch and the worker: about 3 s
def test_the_per_worker_entry_loads_no_ray_and_no_pipelining():
    """What torchrun runs on every rank: Ray is for the launcher and the Ray layer only. Nor does
    it load torch's pipelining (and with it torch._dynamo, about a second of CPU) before a run with
    pipeline parallel builds its schedule: the Ray driver plans through the same modules."""
    loaded = loaded_by(["raytitan.worker", "raytitan.trainer.worker"],
                       ("ray.", "torch.distributed.pipelining", "torch._dynamo"))  # Ray loads ray.* with ray
    assert not loaded, f"importing raytitan.worker loads: {loaded[:10]}"


def test_the_data_planes_actors_load_no_torch():
    """The feeder, its packers, the read-ahead gate and the relays are separate processes that
    start with every launch: importing torch would cost each about a second of CPU before the
    first step (the training ranks' client is ``raytitan.ray.feed_loader``; DCP's reader and
    writer over the storage layer are ``raytitan.components.checkpoint.dcp_files``)."""
    loaded = loaded_by(["raytitan.ray.data_feed", "raytitan.components.data.sources", "raytitan.components.storage"],
                       ("torch.",))  # torch loads torch.* with itself
    assert not loaded, f"the data plane's modules load torch: {loaded[:10]}"


def test_local_ray_workers_find_ray_not_the_ray_layer():
    """The launcher puts the folder holding raytitan on a local Ray instance's worker path: with
    it first, ``import ray`` must still be Ray (raytitan/ray/ on the path instead would make
    every worker fail to start, and the run wait for them forever)."""
    import os

    from raytitan.ray.launcher import import_root

    assert pathlib.Path(import_root()) == PACKAGE.parent
    code = "import ray, raytitan; print(ray.__file__); print(raytitan.__file__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd="/",
                          env={**os.environ, "PYTHONPATH": import_root()})
    assert done.returncode == 0, done.stderr
    ray_file, raytitan_file = map(pathlib.Path, done.stdout.split())
    assert raytitan_file.parent == PACKAGE and not ray_file.is_relative_to(PACKAGE), (ray_file, raytitan_file)


def test_only_the_ray_layer_imports_ray():
    offenders = []
    for name, path in MODULES.items():
        if path.is_relative_to(RAY_LAYER):
            continue
        for line, module, _ in imports(path):
            if module == "ray" or module.startswith("ray."):
                offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}")
    assert not offenders, "only raytitan/ray/ may import Ray:\n" + "\n".join(offenders)


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports. ``from raytitan.x import y`` is an import of
    ``raytitan.x.y`` where that is a module, else of ``raytitan.x``; the parent packages Python
    imports on the way are not counted."""
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for name, path in MODULES.items():
        for _, module, names in imports(path):
            if module.split(".")[0] != "raytitan":
                continue
            targets = [f"{module}.{n}" if f"{module}.{n}" in MODULES else module for n in names] or [module]
            graph[name].update(t for t in targets if t in MODULES and t != name)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    components.append(sorted(component))
    return components


def cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One loop through a component, as a -> b -> ... -> a (shortest from its first module)."""
    start = component[0]
    members = set(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    return paths[node] + [start]
                if child not in paths:
                    paths[child] = paths[node] + [child]
                    following.append(child)
        frontier = following
    return component


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert [c for c in strongly_connected(graph) if len(c) > 1] == [["a", "b", "c"]]
    assert cycle_in(["a", "b", "c"], graph) == ["a", "b", "c", "a"]


def test_no_import_cycles_in_the_package():
    graph = import_graph()
    assert graph["raytitan.trainer.worker"], "the import graph came out empty: the parser missed the imports"
    cycles = [cycle_in(c, graph) for c in strongly_connected(graph) if len(c) > 1]
    assert not cycles, "import cycles in raytitan (function-level imports included):\n" + "\n".join(
        " -> ".join(c) for c in cycles)


def layer_of(module: str) -> str:
    """The layer a module belongs to: its folder under raytitan/ (config, trainer, components,
    distributed, models, ray, tools), or the module itself for the top-level entries."""
    return ".".join(module.split(".")[:2])




def test_no_import_cycles_between_the_layers():
    """Folders too: e.g. models/ builds on distributed/, so distributed/ must not reach back."""
    layers: dict[str, set[str]] = {}
    examples: dict[tuple[str, str], str] = {}
    graph = import_graph()
    for module, imported in graph.items():
        for target in imported:
            a, b = layer_of(module), layer_of(target)
            layers.setdefault(a, set())
            layers.setdefault(b, set())
            if a != b:
                layers[a].add(b)
                examples.setdefault((a, b), f"{module} imports {target}")
    cycles = [cycle_in(c, layers) for c in strongly_connected(layers) if len(c) > 1]
    assert not cycles, "import cycles between raytitan's layers:\n" + "\n".join(
        " -> ".join(c) + "  (" + "; ".join(examples[a, b] for a, b in zip(c, c[1:])) + ")" for c in cycles)


def test_no_module_outside_models_imports_a_model_family():
    """The rest of the package talks to a ModelSpec (``raytitan.models.get_spec``), never to a
    family's own modules."""
    models = PACKAGE / "models"
    families = {p.name for p in models.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    found = [f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
             for name, path in MODULES.items() if not path.is_relative_to(models)
             for line, module, _ in imports(path)
             if module and module.split(".")[:3] in [["raytitan", "models", f] for f in families]]
    assert families and not found, "\n".join(found)
