"""The one entry point to the benchmarks: run one by name, all of them, or list them.

    python benchmarks/run.py --list               # every benchmark, what it measures, what it needs
    python benchmarks/run.py uniform              # one (arguments after the name go to its script)
    python benchmarks/run.py kernel_speed --gpu        # e.g. the GPU kernels, on a CUDA machine
    python benchmarks/run.py all                  # every one that needs nothing beyond the test extras
    python -m benchmarks NAME ...                 # the same, from the repository root

A benchmark is a script ``benchmarks/NAME.py`` (names starting with ``_`` are its helpers); it writes
its results into ``benchmarks/results/NAME/``, each result with the machine and the command that
made it. ``peers`` runs the peer libraries' harness in its own virtual environment. After a run,
``python benchmarks/docs_tables.py --write`` regenerates the tables the docs show from the results.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
NOT_BENCHMARKS = {"run", "docs_tables", "__main__"}
PEERS_PYTHON = HERE / ".venv-peers" / "bin" / "python"

# What a benchmark needs beyond `scripts/setup.sh test`; `all` leaves these out.
NEEDS = {
    "engines": "llama-cpp-python (extra `engines`; compiles llama.cpp, about 15 minutes on 2 cores)",
    "vs_llama_cpp": "llama-cpp-python (extra `engines`, as engines)",
    "peers": "the peers' virtual environment: bash benchmarks/peers/setup.sh",
}
# pareto sets AMPQ against the uniform rows that schemes and uniform measured: it runs after them
LAST = ["pareto"]


def benchmarks() -> dict[str, Path]:
    found = {p.stem: p for p in sorted(HERE.glob("*.py")) if not p.stem.startswith("_") and p.stem not in NOT_BENCHMARKS}
    found["peers"] = HERE / "peers" / "run_peer.py"
    return dict(sorted(found.items(), key=lambda kv: (kv[0] in LAST, kv[0])))


def summary(script: Path) -> str:
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return " ".join(doc.split("\n\n")[0].split())


def command(name: str, script: Path, args: list[str]) -> list[str]:
    if name == "peers":
        if not PEERS_PYTHON.exists():
            raise SystemExit(f"benchmark peers needs {NEEDS['peers']}")
        return [str(PEERS_PYTHON), str(script), *args]
    return [sys.executable, str(script), *args]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    table = benchmarks()
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    if argv[0] == "--list":
        for name, script in table.items():
            needs = f" [needs {NEEDS[name]}]" if name in NEEDS else ""
            print(f"{name:12} {summary(script)}{needs}")
        return 0
    name, args = argv[0], argv[1:]
    if name == "all":
        for one, script in table.items():
            if one in NEEDS:
                print(f"== {one}: left out (needs {NEEDS[one]})", flush=True)
                continue
            print(f"== {one}", flush=True)
            code = subprocess.call(command(one, script, args))
            if code:
                return code
        return 0
    if name not in table:
        raise SystemExit(f"no benchmark named {name!r}: `python benchmarks/run.py --list` lists them")
    return subprocess.call(command(name, table[name], args))


if __name__ == "__main__":
    sys.exit(main())
