"""Calibration activations that go to disk once they pass a byte limit.

A list of tensors (one per calibration batch) that keeps the first ones in memory while their
bytes stay under ``limit`` and writes the rest to files in ``directory``, reading each back when
asked for. With a ``device`` (a GPU), the first ones stay on it while they fit ``device_limit``,
the next in pinned CPU memory (copied back quickly), then disk; every read comes back on the
device. Bytes round-trip exactly, so a run that spills computes what one that does not would.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ampq.atomic import atomic_file
from ampq.io.safetensors_file import StoredTensor


class ActivationStore:
    def __init__(self, limit: int | None = None, directory: str | Path | None = None, *,
                 device: torch.device | None = None, device_limit: int | None = None):
        self.limit = limit
        self.device = device
        self.device_limit = device_limit
        self.on_device = 0  # bytes kept on the device
        self._parent = Path(directory) if directory is not None else None
        self._dir: Path | None = None
        self._items: list[torch.Tensor | StoredTensor | None] = []
        self.in_memory = 0
        self.spilled = 0  # how many tensors were written to disk, over the store's life

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> torch.Tensor:
        item = self._items[i]
        t = item if isinstance(item, torch.Tensor) else item.read()
        return t if self.device is None else t.to(self.device, non_blocking=True)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return (self[i] for i in range(len(self)))

    def stored(self, i: int) -> torch.Tensor | StoredTensor:
        """Item ``i`` as held: a tensor, or where its bytes lie on disk (streams without loading)."""
        return self._items[i]

    def append(self, t: torch.Tensor) -> None:
        self._items.append(None)  # a placeholder, replaced at once
        self[len(self._items) - 1] = t

    def __setitem__(self, i: int, t: torch.Tensor) -> None:
        old = self._items[i]
        self._items[i] = None  # its bytes no longer count
        if isinstance(old, torch.Tensor):
            if self.device is not None and self.device.type != "cpu" and old.device == self.device:
                self.on_device -= old.numel() * old.element_size()
            else:
                self.in_memory -= old.numel() * old.element_size()
        nbytes = t.numel() * t.element_size()
        if self.device is not None and self.device.type != "cpu":
            if self.device_limit is None or self.on_device + nbytes <= self.device_limit:
                self._items[i] = t.to(self.device)
                self.on_device += nbytes
                return
            if self.limit is None or self.in_memory + nbytes <= self.limit:
                host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                host.copy_(t)
                self._items[i] = host
                self.in_memory += nbytes
                return
        elif self.limit is None or self.in_memory + nbytes <= self.limit:
            self._items[i] = t
            self.in_memory += nbytes
            return
        path = self._directory() / f"{i:06d}.bin"
        t = t.detach().cpu().contiguous()
        # the old item may still be read from this name until the rename; scratch: no flush to disk
        with atomic_file(path, durable=False) as tmp, open(tmp, "wb") as f:
            f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._items[i] = StoredTensor(path, 0, t.dtype, tuple(t.shape))
        self.spilled += 1

    def _directory(self) -> Path:
        if self._dir is None:
            if self._parent is not None:
                self._parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=".ampq-spill-", dir=self._parent))
        return self._dir

    def close(self) -> None:
        """Delete the spilled files."""
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
        self._items.clear()
        self.in_memory = self.on_device = 0

    def __del__(self):
        self.close()
