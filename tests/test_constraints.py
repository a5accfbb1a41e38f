"""constraints.txt (what setup.sh and CI install) stays consistent with pyproject.toml's open ranges."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("lock", ROOT / "scripts" / "lock.py")
lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(lock)


def _declared() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    for extra in lock.EXTRAS:
        reqs += [Requirement(r) for r in project["optional-dependencies"][extra]]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


def test_every_declared_dependency_is_pinned_within_its_range():
    pins = lock.read_pins(ROOT / "constraints.txt")
    for req in _declared():
        name = lock.canonical(req.name)
        assert name in pins, f"{name} is declared in pyproject.toml but not pinned: run scripts/lock.py"
        assert Version(pins[name]) in req.specifier, (
            f"{name}=={pins[name]} is outside pyproject's {req.specifier}: re-lock (see scripts/lock.py)")


def test_setup_script_installs_with_the_pins():
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    assert "constraints.txt" in setup and "-c " in setup
