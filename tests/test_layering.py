"""The import graph of fld-engine's own packages, read from the code (function-level imports included):
no cycles, the engine never imports a stage package, the kernel never imports the read side
(engine/views/), only engine/runners/* import ray or apache_beam."""
from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("engine", "annotators", "filters", "refine", "schemas")


def import_graph(root: Path = REPO) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(our module -> our modules it imports, third-party top-level name -> our modules importing it)."""
    files = {}
    for pkg in PACKAGES:
        for f in (root / pkg).rglob("*.py"):
            files[".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = f

    def ours(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    third: dict[str, set[str]] = {}
    for module, f in files.items():
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in files]
                names = subs if subs and len(subs) == len(node.names) else [node.module, *subs]
            else:
                continue
            for name in names:
                target = ours(name)
                # a module importing its own package's __init__ (which imports it) is not a cycle
                if target and target != module and not module.startswith(target + "."):
                    graph[module].add(target)
                third.setdefault(name.split(".")[0], set()).add(module)
    return graph, third


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter[0]; counter[0] += 1; stack.append(start); on.add(start)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = counter[0]; counter[0] += 1; stack.append(w); on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    x = stack.pop(); on.discard(x); component.append(x)
                    if x == v:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycles():
    graph, _ = import_graph()
    assert len(graph) > 50 and cycles(graph) == []


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_engine_imports_no_stage_package():
    graph, _ = import_graph()
    wrong = sorted((m, t) for m, ts in graph.items() if m.split(".")[0] == "engine" for t in ts
                   if t.split(".")[0] in ("annotators", "filters", "refine"))
    assert wrong == []


def kernel_reads(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    """(kernel module, read-side module it imports): the kernel is engine/ minus engine/views/ and the CLI."""
    kernel = [m for m in graph if m.split(".")[0] == "engine" and not m.startswith("engine.views")
              and m not in ("engine.cli", "engine.views")]
    return sorted((m, t) for m in kernel for t in graph[m] if t == "engine.views" or t.startswith("engine.views."))


def test_the_kernel_never_imports_the_read_side():
    graph, _ = import_graph()
    assert any(m.startswith("engine.views.") for m in graph) and kernel_reads(graph) == []


def test_a_kernel_import_of_the_read_side_is_found():
    graph = {"engine.run": {"engine.views.query"}, "engine.cli": {"engine.views.show"},
             "engine.views.show": {"engine.views.query", "engine.store"}}
    assert kernel_reads(graph) == [("engine.run", "engine.views.query")]


def test_the_stage_contract_and_ingest_share_helpers_without_importing_each_other():
    graph, _ = import_graph()
    ingest = [m for m in graph if m == "engine.ingest" or m.startswith("engine.ingest.")]
    leans = sorted((a, b) for a in ingest for b in graph[a] if b == "engine.stage")
    leans += sorted(("engine.stage", b) for b in graph["engine.stage"] if b in ingest)
    assert leans == [] and {"engine.images"} <= graph["engine.stage"] & set().union(*(graph[m] for m in ingest))


def test_only_the_runners_import_ray_and_beam():
    _, third = import_graph()
    users = third.get("ray", set()) | third.get("apache_beam", set())
    assert users and all(m.startswith("engine.runners.") for m in users), sorted(users)


def test_the_graph_sees_function_level_imports(tmp_path):
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "__init__.py").write_text("")
    (tmp_path / "engine" / "x.py").write_text("def f():\n    from filters.y import z\n    import ray.data\n")
    (tmp_path / "filters").mkdir()
    (tmp_path / "filters" / "y.py").write_text("z = 1\n")
    for pkg in ("annotators", "refine", "schemas"):
        (tmp_path / pkg).mkdir()
    graph, third = import_graph(tmp_path)
    assert graph["engine.x"] == {"filters.y"} and third["ray"] == {"engine.x"}
