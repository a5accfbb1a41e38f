"""Writes constraints.txt: the exact version of every package that `pip install -e .[test]` brings in,
read from the environment this script runs in (the closure of ampq's requirements, not `pip freeze`,
so tools installed beside it do not leak in).

Moving the pins forward (e.g. monthly):
    python3 -m venv /tmp/lock && . /tmp/lock/bin/activate
    pip install torch==<new CPU version> && pip install -e ".[test]"     # no -c: newest allowed versions
    python scripts/lock.py && python -m pytest -q                          # pins what the tests just passed on
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("test",)
SKIP = {"ampq", "setuptools", "pip", "wheel"}  # the project itself and the build tools


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: tuple[str, ...]) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:  # an extra that was not installed (setup.sh without `test`)
            continue
        key = canonical(dist.metadata["Name"])
        if key in pins and not wanted:
            continue
        pins[key] = dist.version.split("+")[0]  # torch's local label (+cpu) is not part of the pin
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in (wanted or ("",))):
                if canonical(req.name) not in pins:
                    todo.append((req.name, tuple(req.extras)))
    return {k: v for k, v in sorted(pins.items()) if k not in SKIP}


def read_pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonical(name)] = version
    return pins


def check() -> int:
    """Says which installed packages differ from the pins (the tests were not run on that mix)."""
    pins = read_pins(ROOT / "constraints.txt")
    installed = closure("ampq", EXTRAS)
    off = [f"{n} {installed.get(n, 'missing')} (pinned {v})" for n, v in pins.items()
           if n in installed and installed[n] != v]
    if off:
        print("installed versions differ from constraints.txt: " + ", ".join(off), file=sys.stderr)
    return 1 if off else 0


def main() -> int:
    if "--check" in sys.argv:
        return check()
    pins = closure("ampq", EXTRAS)
    lines = [f"# written by scripts/lock.py with Python {sys.version.split()[0]}; what `.[test]` resolved to and the tests passed on",
             *(f"{name}=={version}" for name, version in pins.items())]
    out = ROOT / "constraints.txt"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(out)
    print(f"{len(pins)} pins written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
