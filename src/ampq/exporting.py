"""``ampq.export``: an ampq checkpoint written for another engine (compressed-tensors for vLLM, GGUF
for llama.cpp); the writers are in :mod:`ampq.exporters`."""

from __future__ import annotations

from pathlib import Path

from ampq.errors import AmpqError
from ampq.exporters import export_compressed_tensors
from ampq.exporters.gguf import export_gguf

TARGETS = {"compressed-tensors": export_compressed_tensors, "gguf": export_gguf}


def export(checkpoint: str | Path, out: str | Path, *, to: str = "compressed-tensors", nearest: bool = False,
           overwrite: bool = False) -> dict:
    """Write the checkpoint folder ``checkpoint`` as ``to`` at ``out`` (a folder, or a .gguf file).
    ``nearest`` re-quantizes layers whose format has no exact counterpart to the nearest one that
    has (the summary says how far the weights moved). Returns the summary: ``line``, ``warnings``."""
    if to not in TARGETS:
        raise AmpqError(f"unknown export target {to!r}; choose {' or '.join(TARGETS)}")
    return TARGETS[to](checkpoint, out, nearest, overwrite=overwrite)
