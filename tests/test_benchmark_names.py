"""A script runs with its own folder first on sys.path, so a benchmark named like an installed package
(`kernels`, which transformers imports) would shadow it in every benchmark."""

import importlib.util
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def test_no_benchmark_module_shadows_an_installed_package():
    for script in BENCHMARKS.glob("*.py"):
        if script.stem.startswith("__"):
            continue
        spec = importlib.util.find_spec(script.stem) if script.stem.isidentifier() else None
        origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
        assert origin is None or origin.parent == BENCHMARKS, (
            f"benchmarks/{script.name} shadows the installed module {script.stem} ({origin}); rename it")
