"""pyproject.toml declares every third-party module the code imports, and nothing it doesn't.

The next undeclared import fails here rather than on a user's fresh machine.
"""
from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import lru_cache
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE_PACKAGES = ("experiments", "lightning_modules", "datamodules", "sweeps", "benchmarks")

# Declared without being imported by the suite's own code, and why.
DECLARED_NOT_IMPORTED = {
    "torchvision": "segmentation-models-pytorch and timm import it; the lock pins it with its torch",
    "psutil": "MLflow imports it to sample a run's system metrics (CPU, memory, disk)",
    "nvidia-ml-py": "MLflow imports it (pynvml) to sample a run's GPU metrics",
}
# Imported only when present (behind a try/except with a clear message), so not declared.
OPTIONAL_IMPORTS = {
    "bitsandbytes": "8-bit AdamW for GPU fine-tunes, used only when the user installed it",
}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_name(requirement: str) -> str:
    return _normalise(re.split(r"[\s\[<>=!~;]", requirement.strip(), maxsplit=1)[0])


def _declared() -> tuple[set, set]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = {_requirement_name(r) for r in project["dependencies"]}
    extras = {_requirement_name(r) for reqs in project.get("optional-dependencies", {}).values() for r in reqs}
    return main, extras


def _imported_modules(folders) -> dict:
    """Top-level module name -> first file that imports it (absolute imports only)."""
    local = set(SOURCE_PACKAGES) | {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    found: dict = {}
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    names = [node.module]
                else:
                    continue
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in local and top != "__future__":
                        found.setdefault(top, str(path.relative_to(ROOT)))
    return found


@lru_cache(maxsize=1)
def _module_to_distributions() -> dict:
    return packages_distributions()


def _distributions(module: str) -> set:
    return {_normalise(d) for d in _module_to_distributions().get(module, [])}


def test_every_import_of_the_source_is_a_declared_dependency():
    main, _ = _declared()
    undeclared = {module: where for module, where in _imported_modules(SOURCE_PACKAGES).items()
                  if module not in OPTIONAL_IMPORTS and not _distributions(module) & main}
    assert not undeclared, f"imported but not in [project].dependencies of pyproject.toml: {undeclared}"


def test_every_import_of_the_tests_is_declared_in_the_dependencies_or_an_extra():
    main, extras = _declared()
    undeclared = {module: where for module, where in _imported_modules(["tests"]).items()
                  if module not in OPTIONAL_IMPORTS and not _distributions(module) & (main | extras)}
    assert not undeclared, f"tests import modules no dependency or extra declares: {undeclared}"


def test_every_declared_dependency_is_imported_or_has_a_stated_reason():
    main, _ = _declared()
    imported = set()
    for module in _imported_modules(SOURCE_PACKAGES):
        imported |= _distributions(module)
    unused = main - imported - set(DECLARED_NOT_IMPORTED)
    assert not unused, f"declared in pyproject.toml but never imported: {sorted(unused)}"


def test_the_lock_pins_every_declared_dependency_exactly():
    main, extras = _declared()
    pinned = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.\-]+)==(\S+)", line)
        if match:
            pinned[_normalise(match.group(1))] = match.group(2)
    missing = sorted((main | extras) - set(pinned))
    assert not missing, f"requirements.lock lacks {missing}: run `make lock`"
    assert pinned["torch"] == "2.14.1" and pinned["torchvision"] == "0.29.1"
