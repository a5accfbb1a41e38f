"""Results kept one row per model: a run replaces its models' rows and keeps the others'."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from _machine import machine

from ampq import atomic


def measure_models(out: Path, models: list[str], measure: Callable[[str], dict], markdown: Callable[[dict], str]) -> None:
    """Measure each model, saving after each, then write and print the Markdown table of ``out``."""
    result = json.loads(out.read_text()) if out.exists() else {"rows": []}
    out.parent.mkdir(parents=True, exist_ok=True)
    for model_name in models:
        row = measure(model_name)
        result = {"machine": machine(), "command": " ".join(["python", *sys.argv]),
                  "rows": [r for r in result["rows"] if r["model"] != model_name] + [row]}
        atomic.write_text(out, json.dumps(result, indent=1))
    write_table(out, markdown)


def write_table(out: Path, markdown: Callable[[dict], str]) -> None:
    result = json.loads(out.read_text())
    atomic.write_text(out.with_suffix(".md"), markdown(result))
    print(markdown(result))
