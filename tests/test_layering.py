"""The layering rules, checked from the source tree (AST, no imports): imports only go down.

library (datamodules/, lightning_modules/) → experiments/ → sweeps/ → benchmarks/, counting imports
inside functions and import strings ("package.module:function"); no import cycle; stage modules never
import each other; files and functions stay small unless listed here with a reason.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("datamodules", "lightning_modules")
STAGES = ("finetune", "generate", "validate", "segment")
MAX_LINES = 300
# Files allowed above MAX_LINES, each with its reason.
LONG_FILES = {
    "lightning_modules/diffusion.py": "one LightningModule wrapping the diffusers components (training + sampling)",
    "experiments/pretrain.py": "the tiny base's pretraining script: VAE then UNet phases sharing one resume state",
    "experiments/stages/generate.py": "diffusion and copy-paste share one resumable, batch-atomic writing loop",
    "sweeps/study.py": "the Optuna study: storage, sampler, heartbeat, retries and the objective, one reading",
}
MAX_FUNCTION_LINES = 80
# Functions allowed above MAX_FUNCTION_LINES, each with its reason.
LONG_FUNCTIONS = {
    "lightning_modules/synthesis/sampler.py:inpaint": "one denoising loop with early stopping per row; "
                                                      "its 25-line docstring is the sampler's contract",
}


def _modules(folder: str):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _top(name: str) -> str:
    return name.split(".")[0]


def _stage_of(path: Path):
    """The stage a module under experiments/stages/ belongs to (a module or a package), else None."""
    rel = path.relative_to(ROOT / "experiments" / "stages").parts
    name = rel[0][:-3] if rel[0].endswith(".py") else rel[0]
    return name if name in STAGES else None


def test_stage_modules_do_not_import_each_other():
    bad = {}
    for path in _modules("experiments/stages"):
        own = _stage_of(path)
        others = sorted(n for n in GRAPH[_module_of(path)] if n.startswith("experiments.stages.")
                        and n.split(".")[2] in STAGES and n.split(".")[2] != own)
        if others:
            bad[str(path.relative_to(ROOT))] = others
    assert not bad


def test_every_stage_declares_version_and_inputs():
    for stage in STAGES:
        path = ROOT / "experiments" / "stages" / f"{stage}.py"
        path = path if path.is_file() else ROOT / "experiments" / "stages" / stage / "__init__.py"
        names = {t.id for node in ast.parse(path.read_text()).body if isinstance(node, ast.Assign) for t in node.targets
                 if isinstance(t, ast.Name)}
        funcs = {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}
        assert "VERSION" in names and {"inputs", f"run_{stage}"} <= funcs, path


def test_benchmarks_use_public_names_only():
    bad = {}
    for path in _modules("benchmarks"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and _top(node.module) in (
                    "benchmarks", "experiments", "sweeps", *LIBRARY):
                private = [a.name for a in node.names if a.name.startswith("_")]
                private += [node.module] if any(part.startswith("_") and part != "__init__"
                                                for part in node.module.split(".")) else []
                if private:
                    bad.setdefault(str(path.relative_to(ROOT)), []).extend(private)
    assert not bad


def test_files_stay_small_unless_listed_with_a_reason():
    long = {str(p.relative_to(ROOT)): len(p.read_text().splitlines())
            for folder in ("experiments", "lightning_modules", "datamodules", "sweeps") for p in _modules(folder)}
    over = {k: n for k, n in long.items() if n > MAX_LINES and k not in LONG_FILES}
    assert not over, f"split these files or list them in LONG_FILES with a reason: {over}"


# ---- the import graph: every import (top level or inside a function) and every import string
# ("package.module:function", as lazy command tables resolve with importlib), resolved to modules.
PACKAGES = (*LIBRARY, "experiments", "sweeps", "benchmarks")
LAYER = {"datamodules": 0, "lightning_modules": 0, "experiments": 1, "sweeps": 2, "benchmarks": 3}
_IMPORT_STRING = re.compile(r"^((?:%s)(?:\.\w+)+):\w+$" % "|".join(PACKAGES))


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_of(p): p for folder in PACKAGES for p in _modules(folder)}


def _resolve(name: str):
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _edges(path: Path) -> set:
    """The project modules ``path`` imports: a package itself only when the import names it, not a submodule."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in MODULES]
            names.update(subs + ([node.module] if len(subs) < len(node.names) else []))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _IMPORT_STRING.match(node.value):
            names.add(_IMPORT_STRING.match(node.value).group(1))
    own = _module_of(path)
    return {m for m in map(_resolve, names) if m and m != own}


GRAPH = {name: _edges(path) for name, path in MODULES.items()}


def test_imports_and_import_strings_only_go_down():
    up = sorted(f"{m} -> {t}" for m, targets in GRAPH.items() for t in targets
                if LAYER[t.split(".")[0]] > LAYER[m.split(".")[0]])
    assert not up


def test_no_import_cycle_even_through_function_level_imports():
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v), on_stack.add(v)
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert not cycles


def test_functions_stay_short_unless_listed_with_a_reason():
    long = {}
    for folder in (*LIBRARY, "experiments", "sweeps"):
        for path in _modules(folder):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    key = f"{path.relative_to(ROOT)}:{node.name}"
                    if n > MAX_FUNCTION_LINES and key not in LONG_FUNCTIONS:
                        long[key] = n
    assert not long, f"split these functions or list them in LONG_FUNCTIONS with a reason: {long}"


def test_experiments_root_holds_a_handful_of_modules():
    loose = sorted(p.name for p in (ROOT / "experiments").glob("*.py") if p.name != "__init__.py")
    assert len(loose) <= 10, loose
