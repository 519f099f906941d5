"""The layering rules, checked from the source tree (AST, no imports): imports only go down.

library (datamodules/, lightning_modules/) → experiments/ → sweeps/ → benchmarks/; stage modules
never import each other; files stay small unless listed here with a reason.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ("datamodules", "lightning_modules")
STAGES = ("finetune", "generate", "validate", "segment")
MAX_LINES = 300
# Files allowed above MAX_LINES, each with its reason.
LONG_FILES = {
    "datamodules/procedural.py": "four procedural kinds (polyp, fundus, skin, ultrasound) rendered side by side",
    "experiments/config.py": "the config schema: one dataclass per section, kept together",
    "lightning_modules/diffusion.py": "one LightningModule wrapping the diffusers components (training + sampling)",
    "experiments/pretrain.py": "the tiny base's pretraining script: VAE then UNet phases sharing one resume state",
    "experiments/stages/generate.py": "diffusion and copy-paste share one resumable, batch-atomic writing loop",
}


def _modules(folder: str):
    return sorted(p for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts)


def _imports(path: Path) -> set:
    """Every module name ``path`` imports (top level or inside functions), absolute."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _top(name: str) -> str:
    return name.split(".")[0]


def _stage_of(path: Path):
    """The stage a module under experiments/stages/ belongs to (a module or a package), else None."""
    rel = path.relative_to(ROOT / "experiments" / "stages").parts
    name = rel[0][:-3] if rel[0].endswith(".py") else rel[0]
    return name if name in STAGES else None


@pytest.mark.parametrize("folder", LIBRARY)
def test_library_never_imports_upper_layers(folder):
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if _top(n) in ("experiments", "sweeps", "benchmarks"))
           for p in _modules(folder)}
    assert not {k: v for k, v in bad.items() if v}


def test_experiments_never_import_sweeps_or_benchmarks():
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if _top(n) in ("sweeps", "benchmarks"))
           for p in _modules("experiments")}
    assert not {k: v for k, v in bad.items() if v}


def test_sweeps_never_import_benchmarks():
    bad = {str(p.relative_to(ROOT)): sorted(n for n in _imports(p) if _top(n) == "benchmarks") for p in _modules("sweeps")}
    assert not {k: v for k, v in bad.items() if v}


def test_stage_modules_do_not_import_each_other():
    bad = {}
    for path in _modules("experiments/stages"):
        own = _stage_of(path)
        others = sorted(n for n in _imports(path) if n.startswith("experiments.stages.")
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
            for folder in ("experiments", "lightning_modules", "datamodules") for p in _modules(folder)}
    over = {k: n for k, n in long.items() if n > MAX_LINES and k not in LONG_FILES}
    assert not over, f"split these files or list them in LONG_FILES with a reason: {over}"
