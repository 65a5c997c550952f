"""The install contract: pyproject.toml declares ranges, constraints.txt the exact versions setup.sh installs."""
from __future__ import annotations

import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def declared_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [Requirement(line) for line in project["dependencies"] + [line for group in extras for line in group]]


def pinned_versions() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_every_declared_dependency_is_pinned_inside_its_range():
    pins = pinned_versions()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement.name} is declared in pyproject.toml but has no pin in constraints.txt"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pins[name]}, outside pyproject's {requirement.specifier}")


def test_the_running_interpreter_is_inside_the_declared_python_range():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    running = ".".join(map(str, sys.version_info[:3]))
    assert Requirement(f"python{declared}").specifier.contains(running)


@pytest.mark.skipif(Path(sys.prefix).resolve() != (ROOT / ".venv").resolve(),
                    reason="only setup.sh's environment (.venv) promises the pinned versions")
def test_setup_sh_installed_exactly_the_pinned_versions():
    pins = pinned_versions()
    for requirement in declared_requirements():
        name = canonicalize_name(requirement.name)
        installed = metadata.version(requirement.name).split("+")[0]  # torch reports a local build tag, e.g. +cu130
        assert installed == pins[name], f"{requirement.name}: .venv has {installed}, constraints.txt pins {pins[name]}"
