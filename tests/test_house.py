"""The house rules, read off the code with `ast` (no import runs): no import circle (function-level and
TYPE_CHECKING imports count), no import against the layer table (../shared/ARCHITECTURE.md, docs/overview.md),
no torch at module level where the `labs` process imports, labs only through tasks/api, every function-level
import of launcher/ and tasks/ with its reason, no file over 400 lines and no function over 80 (launcher/,
tasks/, bench/)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import REPO

ROOTS = ("launcher", "tasks", "bench")
HEAVY = ("torch", "deepspeed", "transformers", "datasets", "peft", "faiss", "wandb", "matplotlib", "numpy",
         "fastapi", "uvicorn", "openai")
# A function-level import says why it is one: it keeps torch and DeepSpeed (or another heavy package) out of
# the `labs` process, it loads a package only when the feature is used, or it is an entry point's.
REASONS = ("labs process", "only when", "entry point")

# layer -> (rank, group). An import goes to a lower rank, or within its own group.
LAYERS = {"common": 0, "config": 1, "estimate": 2, "catalogue": 3, "mid": 4, "launch": 5, "work": 5, "rank": 6,
          "top": 7}
LABS_PROCESS = {"common", "config", "estimate", "catalogue", "mid", "launch"}  # no torch at module level
NEVER = {"launch": {"work", "rank"}, "work": {"launch", "rank"}, "rank": {"launch"}}
CATALOGUE = {"tasks", "tasks.api", "tasks.registry", "tasks.options", "tasks.presets", "tasks.data_check", "tasks.smollm2",
             "tasks.model_cache"}
MID = {"launcher.resolve", "launcher.checkpoint.store", "launcher.parallel"}


def layer(mod: str) -> str:
    parts = mod.split(".")
    if mod in CATALOGUE:
        return "catalogue"
    if mod in MID:
        return "mid"
    if parts[0] == "bench" or mod in ("launcher.cli", "launcher.worker", "launcher.serve_cli", "launcher") \
            or parts[:2] == ["launcher", "tools"]:
        return "top"
    if parts[0] == "tasks" or parts[:2] in (["launcher", "parallel"], ["launcher", "checkpoint"]):
        return "work"  # parallel, checkpoint convert/load, the labs
    sub = parts[1] if len(parts) > 1 else ""
    return {"common": "common", "config": "config", "estimate": "estimate", "launch": "launch", "rank": "rank",
            "serve": "rank"}[sub]


def modules() -> dict[str, Path]:
    out = {}
    for root in ROOTS:
        for p in sorted((REPO / root).rglob("*.py")):
            if "results" in p.parts:
                continue
            rel = p.relative_to(REPO).with_suffix("")
            name = ".".join(rel.parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


MODULES = modules()
TREES = {m: ast.parse(p.read_text()) for m, p in MODULES.items()}


def _main_block_lines(tree: ast.Module) -> set[int]:
    lines: set[int] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            lines |= set(range(node.lineno, node.end_lineno + 1))
    return lines


def imports(mod: str):
    """(target module, line, top-level? (None: under `if TYPE_CHECKING:`), in an entry-point block?) for every
    import of `mod`."""
    tree = TREES[mod]
    # module level: the body and its `if`s, except `if TYPE_CHECKING:` (never run; an edge all the same)
    top = {id(n) for n in tree.body} | {id(n) for node in tree.body if isinstance(node, ast.If)
                                        and "TYPE_CHECKING" not in ast.unparse(node.test) for n in node.body}
    typing = {id(n) for node in tree.body if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
              for n in node.body}
    main = _main_block_lines(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            base = node.module or ""
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for n in names:
            yield n, node.lineno, (None if id(node) in typing else id(node) in top), node.lineno in main


def project_edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    for m in MODULES:
        for target, *_ in imports(m):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != m:
                edges[m].add(target)
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    assert circles(project_edges()) == []


def test_a_planted_circle_is_found():
    edges = project_edges()
    edges["launcher.common.errors"] = edges["launcher.common.errors"] | {"launcher.cli"}  # errors -> cli -> ... -> errors
    assert any("launcher.common.errors" in c and "launcher.cli" in c for c in circles(edges))


def test_imports_follow_the_layers():
    bad = []
    for m in MODULES:
        if not m.startswith(("launcher", "tasks")):
            continue
        mine = layer(m)
        for target, line, _, main in imports(m):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if not target or target == m or main:
                continue
            theirs = layer(target)
            if theirs in NEVER.get(mine, ()) or (LAYERS[theirs] > LAYERS[mine]):
                bad.append(f"{MODULES[m].relative_to(REPO)}:{line}: {m} ({mine}) imports {target} ({theirs})")
    assert bad == []


def test_labs_use_only_the_task_interface():
    """A lab (tasks/ outside the catalogue) imports of launcher/ only tasks/api, except in an entry point block."""
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: {target}" for m in MODULES
           if m.startswith("tasks") and m not in CATALOGUE
           for target, line, _, main in imports(m) if target.startswith("launcher") and not main]
    assert bad == []


def test_no_torch_at_module_level_where_the_labs_process_imports():
    bad = [f"{MODULES[m].relative_to(REPO)}:{line}: {target}" for m in MODULES
           if m.startswith(("launcher", "tasks")) and layer(m) in LABS_PROCESS
           for target, line, top, _ in imports(m) if top and target.split(".")[0] in HEAVY]
    assert bad == []


def test_function_level_imports_say_why():
    bad = []
    for m, p in MODULES.items():
        if not m.startswith(("launcher", "tasks")):
            continue
        lines = p.read_text().splitlines()
        for target, line, top, main in imports(m):
            if top is not False or main:
                continue
            said = " ".join(lines[max(0, line - 3):line]).lower()
            if not any(r in said for r in REASONS):
                bad.append(f"{p.relative_to(REPO)}:{line}: {target}")
    assert bad == [], f"{len(bad)} function-level imports without their reason ({' / '.join(REASONS)})"


@pytest.mark.parametrize("root", ROOTS)
def test_files_and_functions_are_small(root):
    big, long = [], []
    for m, p in MODULES.items():
        if not m.startswith(root):
            continue
        n = len(p.read_text().splitlines())
        if n > 400:
            big.append(f"{p.relative_to(REPO)}: {n} lines")
        for node in ast.walk(TREES[m]):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > 80:
                long.append(f"{p.relative_to(REPO)}:{node.lineno}: {node.name} {node.end_lineno - node.lineno + 1} lines")
    assert big == [] and long == []


def test_every_delegated_command_reaches_its_function():
    """`labs rag|compare|peak|export|merge|runs|serve` import their module by name (to keep the others out of the
    `labs` process): a module that moves must move in the table too."""
    import importlib

    from launcher.cli import DELEGATED
    for name, target in DELEGATED.items():
        modname, _, func = target.partition(":")
        assert callable(getattr(importlib.import_module(modname), func or "main", None)), (name, target)
