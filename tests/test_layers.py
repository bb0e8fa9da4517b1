"""The shape of the package: the layer contract of pyproject.toml holds (lint-imports), no module takes part in an
import cycle (imports inside functions count in both), and pand modules are imported inside functions only where
:data:`DEFERRED_IMPORTS` says why."""

import ast
from pathlib import Path

import grimp
from importlinter.cli import lint_imports

ROOT = Path(__file__).resolve().parents[1]

# The only modules that import pand modules inside functions, and why. Each reason is start-up time: these modules
# are loaded to parse a command line or check settings, and what they defer loads torch, Lightning or omegaconf,
# which `--help` and a refused setting must not wait for. Anywhere else an import goes at the top of the module.
DEFERRED_IMPORTS = {
    "pand": "`import pand` stays light; `pand.load_student` loads the deployment module on first use",
    "pand.cli": "the command layer: each command imports its implementation when it runs, so `pand --help` and "
                "`pand COMMAND --help` answer in ~0.1 s",
    "pand.engine.config_checks": "the plain-value checks run before torch is loaded; the checks that need the "
                                 "methods, the engine or the datasets import them where they run",
    "pand.quickstart": "argparse command: `pand quickstart --help` answers before the engine is imported",
    "pand.analysis.sweep": "argparse command (`pand sweep`, `pand gather`): --help and the CSV/plot of `gather` need "
                           "neither omegaconf nor the engine",
    "pand.analysis.tsne": "argparse command: --help answers before torch and the engine are imported",
    "pand.bench": "argparse command: --help answers before the benchmark (torch) is imported",
    "pand.teachers.standin_fit": "argparse command (`pand teacher fit`): --help answers before torch and open_clip "
                                 "are imported",
}


def _function_level_pand_imports() -> dict[str, list[str]]:
    """``{module: ["function: imported module", ...]}`` for every import of a pand module inside a function."""
    found: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "pand").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        for function in ast.walk(ast.parse(path.read_text())):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.level:
                    names = ["pand (relative)"]
                found.setdefault(module, []).extend(f"{function.name}: {n}" for n in names
                                                    if n == "pand" or n.startswith("pand"))
    return {m: sorted(set(v)) for m, v in found.items() if v}


def test_pand_modules_are_imported_inside_functions_only_where_listed_with_a_reason():
    found = _function_level_pand_imports()
    unlisted = {m: v for m, v in found.items() if m not in DEFERRED_IMPORTS}
    assert unlisted == {}, "import these at the top of the module, or add the module to DEFERRED_IMPORTS with why"
    assert sorted(set(DEFERRED_IMPORTS) - set(found)) == []  # a module that no longer defers leaves the list


def test_every_module_imports_only_from_the_layers_below_it(monkeypatch):
    monkeypatch.chdir(ROOT)  # the contract lives in pyproject.toml
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml")) == 0


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative: the graph has ~100 modules)."""
    index, low, on_stack, stack, found, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
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
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_is_part_of_an_import_cycle():
    graph = grimp.build_graph("pand")
    # a package's __init__ importing its own submodules (to register them) is how packages work, not a cycle to fix
    for package in [m for m in graph.modules if graph.find_children(m)]:
        for child in graph.find_children(package):
            if graph.direct_import_exists(importer=package, imported=child):
                graph.remove_import(importer=package, imported=child)
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    graph = grimp.ImportGraph()
    for module in ("a", "b", "c"):
        graph.add_module(module)
    graph.add_import(importer="a", imported="b")
    graph.add_import(importer="b", imported="c")
    graph.add_import(importer="c", imported="a")
    assert _cycles(graph) == [["a", "b", "c"]]
