"""safetensors files read and written a piece at a time, so that memory holds one tensor (or one
chunk of one) rather than the file: the header is parsed and checked here, tensors are read with
positioned reads (not a memory map, whose touched pages would count as the process's memory), and
a file is written by streaming each tensor's bytes after a header computed from shapes alone."""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
    **{name: getattr(torch, attr) for name, attr in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64"),
                                                     ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"))
       if hasattr(torch, attr)},
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20
CHUNK_BYTES = 16 << 20


class SafetensorsError(ValueError):
    """The file is not a safetensors file this module can read (the message says why)."""


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    path: Path
    offset: int  # from the start of the file
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def read(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor, as its own memory, converted to ``dtype`` when given."""
        out = torch.empty(self.shape, dtype=self.dtype)
        if self.nbytes:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                if f.readinto(memoryview(out.view(-1).view(torch.uint8).numpy())) != self.nbytes:
                    raise SafetensorsError(f"{self.path} ended inside tensor data; the file is truncated")
        return out if dtype is None or dtype == self.dtype else out.to(dtype)

    def chunks(self, dtype: torch.dtype | None = None, chunk_bytes: int = CHUNK_BYTES) -> Iterator[torch.Tensor]:
        """The tensor's elements in order, flat, a bounded number at a time (converted to ``dtype``)."""
        step = max(1, chunk_bytes // self.dtype.itemsize)
        total = math.prod(self.shape)
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            for start in range(0, total, step):
                part = torch.empty(min(step, total - start), dtype=self.dtype)
                if f.readinto(memoryview(part.view(torch.uint8).numpy())) != part.numel() * self.dtype.itemsize:
                    raise SafetensorsError(f"{self.path} ended inside tensor data; the file is truncated")
                yield part if dtype is None or dtype == self.dtype else part.to(dtype)


def read_header(path: str | Path) -> tuple[dict[str, StoredTensor], dict[str, str]]:
    """(tensors by name, metadata) of one file, every entry checked against the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        if not 0 < n <= min(MAX_HEADER_BYTES, size - 8):
            raise SafetensorsError(f"{path} is not a safetensors file (header length {n})")
        try:
            header = json.loads(f.read(n).decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise SafetensorsError(f"{path} has a header that is not valid JSON") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} has a header that is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + n
    tensors = {}
    for name, info in header.items():
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(info["shape"])
            begin, end = info["data_offsets"]
            if not all(type(d) is int and d >= 0 for d in (*shape, begin, end)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed or unknown-dtype header entry") from None
        if end - begin != math.prod(shape) * dtype.itemsize or not 0 <= begin <= end <= size - base:
            raise SafetensorsError(f"{path}: tensor {name!r} has offsets [{begin}, {end}] that do not fit its shape "
                                   f"or the file; the file is damaged")
        tensors[name] = StoredTensor(path, base + begin, dtype, shape)
    return tensors, metadata if isinstance(metadata, dict) else {}


def _layout(tensors: Mapping[str, object], metadata: Mapping[str, str] | None) -> tuple[list[str], bytes]:
    # safetensors' own order (widest dtype first, then by name) keeps every tensor aligned
    order = sorted(tensors, key=lambda k: (-tensors[k].dtype.itemsize, k))
    header: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in order:
        t = tensors[name]
        nbytes = math.prod(t.shape) * t.dtype.itemsize
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(header, separators=(",", ":")).encode()
    data += b" " * (-(len(data) + 8) % 8)
    return order, struct.pack("<Q", len(data)) + data


def _pieces(t) -> Iterator[torch.Tensor]:
    if isinstance(t, torch.Tensor):
        flat = t.detach().cpu().contiguous().reshape(-1)
        step = max(1, CHUNK_BYTES // max(1, flat.element_size()))
        for start in range(0, flat.numel(), step):
            yield flat[start:start + step]
    else:
        yield from t.chunks()


def write(path: str | Path, tensors: Mapping[str, object], metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write ``tensors`` (torch tensors, or anything with ``shape``, ``dtype`` and ``chunks()``
    yielding its flat elements) as one safetensors file; return each tensor's SHA-256. Write it
    under a temporary name (:mod:`ampq.atomic`), which also flushes it to disk."""
    order, head = _layout(tensors, metadata)
    hashes = {}
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            h = hashlib.sha256()
            written = 0
            for piece in _pieces(tensors[name]):
                raw = memoryview(piece.contiguous().view(torch.uint8).numpy())
                h.update(raw)
                f.write(raw)
                written += len(raw)
            t = tensors[name]
            if written != math.prod(t.shape) * t.dtype.itemsize:
                raise ValueError(f"tensor {name!r} gave {written} bytes, not the {math.prod(t.shape) * t.dtype.itemsize} "
                                 "its shape needs")
            hashes[name] = h.hexdigest()
    return hashes
