"""Model-agnostic checkpoint storage: safetensors shards + an `ampq.json` manifest with hashes.

Layout is HF-compatible (`model.safetensors` or `model-0000i-of-0000n.safetensors` plus
`model.safetensors.index.json`) so transformers-style tools can find the tensors; `ampq.json`
adds SHA-256 for every file and every tensor so damage is reported instead of silently loaded.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ampq.errors import AmpqError
from ampq.io import safetensors_file
from ampq.atomic import atomic_folder

MANIFEST = "ampq.json"
INDEX = "model.safetensors.index.json"
_RESERVED_KEYS = ("files", "tensors")
_CHUNK = 1 << 20
MAX_MANIFEST_BYTES = 64 << 20


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    # Viewing as uint8 inside torch first: numpy has no bfloat16/float8, so .numpy() would fail.
    raw = t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(memoryview(raw)).hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _is_plain_name(name: object) -> bool:
    return (isinstance(name, str) and name not in ("", ".", "..") and name.isprintable()
            and "/" not in name and "\\" not in name)


def _nbytes(t) -> int:
    return math.prod(t.shape) * t.dtype.itemsize


def _prepare_tensors(tensors: dict[str, object]) -> dict[str, object]:
    out: dict[str, object] = {}
    for name, t in tensors.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tensor names must be non-empty strings, got {name!r}")
        if isinstance(t, torch.Tensor):
            if t.layout != torch.strided or t.device.type == "meta":
                raise ValueError(f"tensor {name!r} must be a dense tensor with data, got {t.layout} on {t.device}")
            t = t.detach().cpu()
        elif not (hasattr(t, "chunks") and hasattr(t, "shape") and isinstance(getattr(t, "dtype", None), torch.dtype)):
            raise ValueError(f"tensor {name!r} must be a torch.Tensor or a stored tensor, got {type(t).__name__}")
        out[name] = t
    return out


def shard_file_names(n: int) -> list[str]:
    """transformers' names for ``n`` safetensors shards."""
    return ["model.safetensors"] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _plan_shards(tensors: dict[str, object], max_shard_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = _nbytes(t)
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def write_shards(folder: str | Path, tensors: dict[str, object], max_shard_bytes: int) -> dict[str, dict[str, str]]:
    """Write ``tensors`` (tensors, or stored tensors that stream from another file) into ``folder``
    as transformers-style safetensors shards of at most ``max_shard_bytes`` each (a lone tensor
    may be larger), plus the index when there is more than one; return each shard's tensors with
    their SHA-256. ``folder`` is meant to be an :func:`~ampq.atomic.atomic_folder`, which
    flushes the files."""
    folder = Path(folder)
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tensors = _prepare_tensors(tensors)
    plan = _plan_shards(tensors, max_shard_bytes)
    names = shard_file_names(len(plan))
    # streamed tensor by tensor: a tensor still on disk elsewhere (a lazily loaded model's
    # unquantized weights) is copied through without ever being whole in memory
    hashes = {shard: safetensors_file.write(folder / shard, {k: tensors[k] for k in keys}, {"format": "pt"})
              for shard, keys in zip(names, plan)}
    if len(plan) > 1:
        total = sum(_nbytes(t) for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": {k: s for s, keys in zip(names, plan) for k in keys}}
        (folder / INDEX).write_text(json.dumps(index, indent=2))
    return hashes


def write_checkpoint(directory: str | Path, tensors: dict[str, object], manifest: dict,
                     extra_files: dict[str, bytes] | None = None, *, max_shard_bytes: int = 2_000_000_000,
                     overwrite: bool = False) -> Path:
    """Atomically write `tensors` (tensors, or stored tensors that stream from another file) as
    safetensors shards plus `extra_files` and `ampq.json` into `directory`."""
    directory = Path(directory)
    extra_files = dict(extra_files or {})
    if not isinstance(manifest, dict):
        raise ValueError(f"manifest must be a dict, got {type(manifest).__name__}")
    clash = [k for k in _RESERVED_KEYS if k in manifest]
    if clash:
        raise ValueError(f"manifest keys {clash} are reserved for the checkpoint's own bookkeeping; rename them")
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"manifest is not JSON-serialisable: {e}") from None
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")

    tensors = _prepare_tensors(tensors)
    n = len(_plan_shards(tensors, max_shard_bytes))
    ours = set(shard_file_names(n)) | {MANIFEST, INDEX}
    for name, data in extra_files.items():
        if not _is_plain_name(name) or name in ours:
            raise ValueError(f"extra file name {name!r} must be a plain file name not clashing with {sorted(ours)}")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"extra file {name!r} must be bytes, got {type(data).__name__}")

    def check_target() -> None:
        if directory.exists() and not directory.is_dir():
            raise AmpqError(f"cannot write checkpoint to {directory}: it exists and is not a directory; choose another path")
        if directory.is_dir() and any(directory.iterdir()) and not overwrite:
            raise AmpqError(f"cannot write checkpoint to {directory}: directory exists and is not empty; "
                            "pass overwrite=True or choose another path")

    check_target()
    directory.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(directory) as tmp:
        files: dict[str, dict] = {}
        entries: dict[str, dict] = {}
        hashes = {k: (shard, sha) for shard, shard_hashes in write_shards(tmp, tensors, max_shard_bytes).items()
                  for k, sha in shard_hashes.items()}
        for k, t in tensors.items():  # in the caller's order, which read_checkpoint gives back
            shard, sha = hashes[k]
            entries[k] = {"file": shard, "dtype": _dtype_name(t.dtype), "shape": list(t.shape), "sha256": sha}
        for name, data in extra_files.items():
            (tmp / name).write_bytes(bytes(data))
        # Hash what is on disk, not what we meant to write.
        for name in [*shard_file_names(n), *([INDEX] if n > 1 else []), *extra_files]:
            files[name] = {"bytes": (tmp / name).stat().st_size, "sha256": _file_sha256(tmp / name)}
        # The manifest goes last: a directory without it is never a complete checkpoint.
        full = {**manifest, "files": files, "tensors": entries}
        (tmp / MANIFEST).write_bytes(json.dumps(full, indent=2, ensure_ascii=False, allow_nan=False).encode())
        check_target()  # someone may have created it while we were writing
    return directory


def _verify(directory: str | Path, keep: bool) -> tuple[dict[str, torch.Tensor], dict]:
    d = Path(directory)

    def damaged(problem: str) -> AmpqError:
        return AmpqError(f"checkpoint {d} is damaged: {problem}; re-create or re-download it")

    def one_line(e: BaseException) -> str:
        return " ".join(str(e).split()) or type(e).__name__

    if not d.is_dir():
        raise AmpqError(f"checkpoint {d} does not exist or is not a directory; check the path")
    mpath = d / MANIFEST
    if not mpath.is_file():
        raise AmpqError(f"{d} is not an ampq checkpoint: {MANIFEST} is missing; point at a directory written by ampq")
    if mpath.stat().st_size > MAX_MANIFEST_BYTES:
        raise damaged(f"{MANIFEST} is {mpath.stat().st_size:,} bytes, more than any ampq manifest ({MAX_MANIFEST_BYTES:,})")
    try:
        manifest = json.loads(mpath.read_bytes().decode("utf-8"))
    except RecursionError:
        raise damaged(f"{MANIFEST} is nested too deeply to be an ampq manifest") from None
    except UnicodeDecodeError:
        raise damaged(f"{MANIFEST} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise damaged(f"{MANIFEST} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except ValueError as e:  # e.g. an integer of more digits than Python will convert
        raise damaged(f"{MANIFEST} is not valid JSON ({one_line(e)[:120]})") from None
    except OSError as e:
        raise damaged(f"{MANIFEST} cannot be read ({one_line(e)})") from None

    # Structure is checked before use so a hand-edited manifest cannot trigger a KeyError/TypeError.
    if not isinstance(manifest, dict):
        raise damaged(f"{MANIFEST} is not a JSON object")
    files, entries = manifest.get("files"), manifest.get("tensors")
    if not isinstance(files, dict) or not isinstance(entries, dict):
        raise damaged(f"{MANIFEST} lacks its 'files' or 'tensors' table")
    for name, info in files.items():
        if not (_is_plain_name(name) and isinstance(info, dict) and type(info.get("bytes")) is int
                and isinstance(info.get("sha256"), str)):
            raise damaged(f"{MANIFEST} has a malformed entry for file {name!r}")
    for name, e in entries.items():
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and isinstance(e.get("dtype"), str)
                and isinstance(e.get("shape"), list) and all(type(s) is int for s in e["shape"])
                and isinstance(e.get("sha256"), str)):
            raise damaged(f"{MANIFEST} has a malformed entry for tensor {name!r}")
        if e["file"] not in files:
            raise damaged(f"{MANIFEST} puts tensor {name!r} in {e['file']}, which it does not list as a file")

    for name, info in files.items():
        path = d / name
        if not path.is_file():
            raise damaged(f"{name} is missing")
        size = path.stat().st_size
        if size < info["bytes"]:
            raise damaged(f"{name} is truncated ({size} of {info['bytes']} bytes)")
        if size > info["bytes"]:
            raise damaged(f"{name} is longer than recorded ({size} instead of {info['bytes']} bytes)")
        if _file_sha256(path) != info["sha256"]:
            raise damaged(f"{name} has been altered (its SHA-256 differs from the one in {MANIFEST})")

    shards = {e["file"] for e in entries.values()} | {n for n in files if n.endswith(".safetensors")}
    found: dict[str, str] = {}
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(shards):
        try:
            with safe_open(str(d / shard), framework="pt", device="cpu") as f:
                for name in f.keys():
                    e = entries.get(name)
                    if e is None or e["file"] != shard:
                        raise damaged(f"{shard} holds tensor {name!r}, which {MANIFEST} does not list in that file")
                    found[name] = shard
                    t = f.get_tensor(name)
                    if _dtype_name(t.dtype) != e["dtype"] or list(t.shape) != e["shape"]:
                        raise damaged(f"tensor {name!r} in {shard} is {_dtype_name(t.dtype)}{list(t.shape)}, "
                                      f"but {MANIFEST} says {e['dtype']}{e['shape']}")
                    if tensor_sha256(t) != e["sha256"]:
                        raise damaged(f"tensor {name!r} in {shard} does not match its SHA-256 in {MANIFEST}")
                    if keep:
                        # a private copy: safetensors' tensors are views of the file's memory map, which
                        # stays resident while any of them lives, so dropping one would free nothing
                        loaded[name] = t.clone()
        except AmpqError:
            raise
        except Exception as e:  # safetensors raises its own SafetensorError plus assorted OSError/ValueError
            raise damaged(f"{shard} is not a valid safetensors file ({one_line(e)})") from None
    for name, e in entries.items():
        if name not in found:
            raise damaged(f"{MANIFEST} lists tensor {name!r} in {e['file']}, but that file does not contain it")

    if INDEX in files:
        try:
            weight_map = json.loads((d / INDEX).read_bytes().decode("utf-8"))["weight_map"]
        except Exception:
            raise damaged(f"{INDEX} is not a valid safetensors index") from None
        if weight_map != {k: e["file"] for k, e in entries.items()}:
            raise damaged(f"{INDEX} disagrees with {MANIFEST} about which shard holds which tensor")

    return {name: loaded[name] for name in entries} if keep else {}, manifest


def read_checkpoint(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Verify a checkpoint completely, then return (tensors on CPU in saved order, manifest)."""
    return _verify(directory, keep=True)


def verify_checkpoint(directory: str | Path) -> dict:
    """Run every check `read_checkpoint` does without keeping the tensors; return the manifest."""
    return _verify(directory, keep=False)[1]
