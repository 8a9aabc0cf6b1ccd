"""Package metadata: compatible ranges in pyproject.toml, exact versions only in constraints.txt."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def requirements() -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        deps += extra
    return {Requirement(d).name.lower(): Requirement(d) for d in deps}


def constraints() -> dict[str, Version]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.split(r"==", line)
            pins[name.strip().lower().replace("_", "-")] = Version(version.strip())
    return pins


def test_no_dependency_is_pinned_exactly_and_torch_has_a_range():
    reqs = requirements()
    for name, req in reqs.items():
        assert not any(s.operator in ("==", "===") for s in req.specifier), f"{name} is pinned: {req}"
    torch = reqs["torch"].specifier
    assert {s.operator for s in torch} >= {">=", "<"}
    assert torch.contains("2.6.0") and torch.contains("2.13.0") and not torch.contains("3.0.0")


def test_constraints_pin_every_dependency_inside_its_range():
    pins = constraints()
    for name, req in requirements().items():
        key = name.replace("_", "-")
        assert key in pins, f"constraints.txt does not pin {name}"
        assert req.specifier.contains(pins[key], prereleases=True), f"{name}=={pins[key]} is outside {req}"


def test_make_and_ci_install_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    assert '-c constraints.txt -e ".[test]"' in makefile
    assert "make test" in (ROOT / ".ci" / "run").read_text()
