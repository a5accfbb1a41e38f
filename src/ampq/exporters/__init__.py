"""Export ampq checkpoints to other engines' formats (``ampq export DIR --to TARGET OUT``).

One driver (:mod:`ampq.exporters.driver`) runs every export; each target is a package with its
mapping (which of its types holds which ampq format, and the tensors of a layer in it) and its
writer. A target's package needs an optional dependency, so it is imported only when used."""

from __future__ import annotations

import importlib

from ampq.errors import AmpqError
from ampq.exporters.driver import run

# target -> (its package, the class there, the optional package it needs, how to install it)
TARGETS = {
    "compressed-tensors": ("ampq.exporters.compressed_tensors", "CompressedTensors", "compressed_tensors",
                           "pip install 'ampq[export]' (or pip install 'compressed-tensors>=0.15')"),
    "gguf": ("ampq.exporters.gguf", "Gguf", "gguf", "pip install gguf"),
}

__all__ = ["TARGETS", "export_checkpoint", "export_compressed_tensors", "export_gguf"]


def export_checkpoint(directory, out, to: str, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` to ``out`` in the format ``to`` (one of
    :data:`TARGETS`). Layers whose format the target cannot hold exactly are refused, all in one
    error, unless ``nearest`` (then re-quantized, the change reported). An existing ``out`` is
    refused unless ``overwrite``. Returns a summary; its ``line`` is what the CLI prints."""
    if to not in TARGETS:
        raise AmpqError(f"cannot export to {to!r}: the targets are {', '.join(TARGETS)}")
    module, name, package, install = TARGETS[to]
    try:
        target = getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as e:
        if e.name != package and not (e.name or "").startswith(package + "."):
            raise
        raise AmpqError(f"exporting to {to} needs the {package.replace('_', '-')} package: {install}") from None
    return run(target, directory, out, nearest, overwrite=overwrite)


def export_compressed_tensors(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """A compressed-tensors checkpoint (what vLLM loads): see :mod:`ampq.exporters.compressed_tensors`."""
    return export_checkpoint(directory, out, "compressed-tensors", nearest, overwrite=overwrite)


def export_gguf(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """One GGUF file (what llama.cpp runs): see :mod:`ampq.exporters.gguf`."""
    return export_checkpoint(directory, out, "gguf", nearest, overwrite=overwrite)
