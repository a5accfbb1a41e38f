"""Reading an adaptive layer's residual levels back from the checkpoint it was loaded from: one
tensor at a time through safetensors' memory map, each checked against its SHA-256 in the manifest."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from safetensors import safe_open

from ampq.errors import AmpqError
from ampq.io.checkpoint import tensor_sha256


class CheckpointResiduals:
    """The residuals of layer ``prefix`` in checkpoint ``directory`` (``entries``: the manifest's
    tensor table), for :class:`ampq.nested.NestedLinear` to read when it switches up."""

    def __init__(self, directory: str | Path, prefix: str, entries: dict[str, dict]):
        self.directory, self.prefix, self.entries = Path(directory), prefix, entries

    def part(self, suffix: str) -> "CheckpointResiduals":
        return CheckpointResiduals(self.directory, f"{self.prefix}.{suffix}", self.entries)

    def read(self, k: int, nbytes: int) -> dict[str, torch.Tensor]:
        head = f"{self.prefix}.residuals.{k - 1}."
        names = [n for n in self.entries if n.startswith(head)]
        if not names:
            raise AmpqError(f"{self.directory} does not store residual {k} of {self.prefix}; it holds fewer levels "
                            "than this layer expects")
        stored = {}
        for name in names:
            entry = self.entries[name]
            try:
                t = _get_tensor(self.directory / entry["file"], name)
            except Exception as e:  # noqa: BLE001 - a missing or rewritten file, whatever safetensors raises
                raise AmpqError(f"cannot read residual {k} of {self.prefix} back from {self.directory} "
                                f"({' '.join(str(e).split())[:160]}); the checkpoint was moved or damaged") from None
            if tensor_sha256(t) != entry["sha256"]:
                raise AmpqError(f"checkpoint {self.directory} is damaged: tensor {name!r} no longer matches its "
                                "SHA-256; re-create or re-download it")
            stored[name.rpartition(".")[2]] = t
        if sum(t.numel() * t.element_size() for t in stored.values()) != nbytes:
            raise AmpqError(f"checkpoint {self.directory}: residual {k} of {self.prefix} does not hold the bytes its "
                            "format needs")
        return stored


_open_files: dict | None = None


@contextlib.contextmanager
def reading():
    """Within this block, each checkpoint file is opened (and its header parsed) once, not once
    per tensor: a whole-model switch reads hundreds of residual tensors."""
    global _open_files
    outer, _open_files = _open_files, {}
    try:
        yield
    finally:
        for handle in _open_files.values():
            handle.__exit__(None, None, None)
        _open_files = outer


def _get_tensor(path, name: str) -> torch.Tensor:
    if _open_files is None:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return f.get_tensor(name).clone()
    handle = _open_files.get(path)
    if handle is None:
        handle = _open_files[path] = safe_open(str(path), framework="pt", device="cpu").__enter__()
    return handle.get_tensor(name).clone()  # a copy, not a view that keeps the whole file mapped
