"""Export ampq checkpoints to other engines' formats (``ampq export DIR --to compressed-tensors OUT``)."""

from __future__ import annotations

__all__ = ["export_compressed_tensors"]


def export_compressed_tensors(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """See :func:`ampq.export.compressed_tensors.export_compressed_tensors` (imported lazily: it needs the
    optional ``compressed-tensors`` package)."""
    from ampq.export.compressed_tensors import export_compressed_tensors as export

    return export(directory, out, nearest, overwrite=overwrite)
