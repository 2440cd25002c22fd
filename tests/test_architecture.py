"""The tree shows the pipeline, and its imports keep to it (docs/architecture.md).

Every module's imports — at the top or inside a function — are read with ``ast``: no cycle,
no module importing one of a later stage, the kernel free of the inputs, the store, Ray and
the CLI, the store free of planning, Ray only in ``run/actors.py``, the library never
importing the CLI.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The stages, in the order data flows (docs/architecture.md); 0 is shared by all.
STAGES = {
    "raydiff": 0, "raydiff.errors": 0, "raydiff.options": 0, "raydiff.records": 0, "raydiff.dtypes": 0,
    "raydiff.inputs": 1, "raydiff.plan": 2, "raydiff.kernel": 3, "raydiff.store": 4, "raydiff.run": 5,
    "raydiff.query": 6, "raydiff.watch": 7, "raydiff.demo": 8, "raydiff.cli": 9,
}


def modules() -> dict[str, Path]:
    """Dotted name → file of every module of the library and the CLI (as installed)."""
    out = {}
    for path in sorted((ROOT / "raydiff").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "cli").glob("*.py")):
        out["raydiff.cli" if path.stem == "__init__" else f"raydiff.cli.{path.stem}"] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``name`` imports, top-level or local: ``from x import y`` is ``x.y`` when
    that is a module of ours, else ``x``. A module's own parent packages are left out (Python
    runs them first whatever the module imports)."""
    out = set()
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            out |= subs if len(subs) == len(node.names) else subs | {base}
    return {m for m in out if not (name + ".").startswith(m + ".")}


def stage(name: str) -> int | None:
    best = None
    for prefix, s in STAGES.items():
        if name == prefix or name.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, s)
    return best[1] if best else None


def problems(graph: dict[str, set[str]]) -> list[str]:
    """Every break of the rules in an import graph (module → modules it imports)."""
    found = []
    ours = set(graph)
    for mod, deps in graph.items():
        for dep in deps:
            if dep.split(".")[0] == "ray" and mod != "raydiff.run.actors":
                found.append(f"{mod} imports ray (only raydiff.run.actors may)")
            if dep not in ours:
                continue
            if stage(dep) is not None and stage(mod) is not None and stage(dep) > stage(mod):
                found.append(f"{mod} (stage {stage(mod)}) imports {dep} of a later stage ({stage(dep)})")
            if mod.startswith("raydiff.kernel") and dep.startswith(("raydiff.inputs", "raydiff.store", "raydiff.cli")):
                found.append(f"{mod}: the kernel imports {dep}")
            if mod.startswith("raydiff.store") and dep == "raydiff.plan":
                found.append(f"{mod}: the store imports the planner")
            if not mod.startswith("raydiff.cli") and dep.startswith("raydiff.cli"):
                found.append(f"{mod}: the library imports the CLI ({dep})")
    # cycles, by depth-first search over our modules
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(x for x in graph[m] if x in ours and x != m):
            if state.get(d) == 1:
                found.append("import cycle: " + " → ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return found


def _graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {d for d in imports(name, path, set(mods)) if d in mods or d.split(".")[0] == "ray"}
            for name, path in mods.items()}


def test_every_module_belongs_to_a_stage():
    assert [m for m in modules() if stage(m) is None] == []
    assert {"raydiff.run.actors", "raydiff.kernel.diff", "raydiff.store.layout", "raydiff.query.views"} <= set(modules())


def test_imports_keep_to_the_pipeline():
    assert problems(_graph()) == []


def test_the_checker_sees_each_kind_of_break():
    """The rules above can fail: a planted import of each kind is reported."""
    graph = _graph()
    bad = {k: set(v) for k, v in graph.items()}
    bad["raydiff.kernel.diff"] |= {"raydiff.store.store", "raydiff.inputs.hub"}
    bad["raydiff.store.commit"] |= {"raydiff.plan"}
    bad["raydiff.query.views"] |= {"ray"}
    bad["raydiff.plan"] |= {"raydiff.run.submit"}
    bad["raydiff.inputs.refs"] |= {"raydiff.cli.render"}
    bad["raydiff.store.files"] |= {"raydiff.store.store"}  # store.store imports files: a cycle
    found = "\n".join(problems(bad))
    for words in ("the kernel imports raydiff.store.store", "the kernel imports raydiff.inputs.hub",
                  "the store imports the planner", "raydiff.query.views imports ray",
                  "raydiff.plan (stage 2) imports raydiff.run.submit of a later stage (5)",
                  "the library imports the CLI (raydiff.cli.render)", "import cycle: "):
        assert words in found, (words, found)
