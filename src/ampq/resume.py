"""Resumable quantization runs.

After each decoder block, what the block became (its state, with each QuantLinear's format) and,
with calibration, the next block's inputs are written beside the output, each file under a
temporary name and then renamed, and only then the count of finished blocks. A run killed at any
moment and started again with the same arguments restores the finished blocks instead of
quantizing them, continues from the saved inputs, and so writes the same bytes as a run that was
never killed. Different arguments or a different model start afresh. A run holds a lock beside
its progress folder while it lives, so a second run writing the same output stops at once instead
of overwriting the first one's files (the lock goes with the process, however it ends).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ampq.errors import AmpqError
from ampq import atomic
from ampq.io import safetensors_file
from ampq.io.lazy import sample as stored_sample
from ampq.io.lazy import weights_of
from ampq.layer_table import install_layer, layer_entries, spare_state
from ampq.ranks import Ranks

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; two runs there must not share an output
    fcntl = None

# the locks this process holds, by path: a run that raised keeps its lock until the next run of the
# same output in this process takes it over (another process still finds it held)
_HELD: dict[str, object] = {}

RUN, STATE = "run.json", "state.json"


def progress_dir(output: Path) -> Path:
    """Where a run writing ``output`` keeps its progress: a hidden folder beside it."""
    output = Path(output)
    return output.parent / f".{output.name}.ampq-resume"


def fingerprint(model: nn.Module) -> str:
    """A cheap identity of a model's weights: names, shapes, dtypes and 4096 evenly spaced values of
    every tensor, hashed (hashing all of a multi-GB model would cost seconds on every run)."""
    weights = weights_of(model)
    empty = weights.empty_tensors(model) if weights is not None else {}
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        step = max(1, t.numel() // 4096)
        if name in empty:  # still on disk (a lazily loaded model): the same values, read in chunks
            sample = stored_sample(*empty[name], step)
        else:
            sample = t.detach().reshape(-1)[::step].contiguous().cpu()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _write_json(path: Path, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, sort_keys=True))


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Resume:
    """Progress of one quantization run, identified by ``key`` (JSON: the model's fingerprint and
    every argument that changes the result). Under several ``ranks`` the main rank writes the
    record and each rank its own calibration batches, so a run resumes with any number of ranks."""

    def __init__(self, directory: Path, key: dict, ranks: Ranks | None = None):
        self.directory = Path(directory)
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))
        self.ranks = ranks or Ranks()
        self.done = 0
        self._lock_file = None
        if self.ranks.main:
            self._lock()
            self._open()
        self.ranks.barrier()
        if not self.ranks.main:
            self._open(reset=False)

    def _open(self, reset: bool = True) -> None:
        if _read_json(self.directory / RUN) == self.key:
            state = _read_json(self.directory / STATE) or {}
            done = state.get("blocks", 0)
            if isinstance(done, int) and done > 0 and all(self._block_file(i).exists() for i in range(done)):
                self.done = done
        if self.done == 0 and reset:
            shutil.rmtree(self.directory, ignore_errors=True)
            self.directory.mkdir(parents=True)
            _write_json(self.directory / RUN, self.key)

    def _lock(self) -> None:
        path = self.directory.with_name(f"{self.directory.name}.lock")
        if fcntl is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        stale = _HELD.pop(str(path.resolve()), None)
        if stale is not None:
            stale.close()
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            pid = handle.read().strip() or "unknown"
            handle.close()
            raise AmpqError(f"another ampq run (process {pid}) is writing the same output (its progress: "
                            f"{self.directory}); wait for it to finish or stop it, then run again") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock_file = _HELD[str(path.resolve())] = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            path = Path(self._lock_file.name)
            path.unlink(missing_ok=True)
            _HELD.pop(str(path.resolve()), None)
            self._lock_file.close()  # closing releases the lock
            self._lock_file = None

    def _block_file(self, i: int) -> Path:
        return self.directory / f"block-{i:05d}.safetensors"

    def save(self, i: int, block: nn.Module | None, inputs: list[torch.Tensor] | None, record: dict | None = None) -> None:
        """Record block ``i`` as finished: what the block became (or, for a stage that measures
        instead of changing it, a JSON ``record`` of what it found), and the next block's inputs."""
        if inputs is not None:
            # streamed one batch at a time: spilled activations go from their file to this one; each
            # batch under its index among all ranks' batches
            world, rank = self.ranks.world, self.ranks.rank
            tensors = {f"{j * world + rank:06d}": _cpu(inputs.stored(j) if hasattr(inputs, "stored") else inputs[j])
                       for j in range(len(inputs))}
            # named by block: the last finished block's inputs must outlive a kill before the count moves on
            with atomic.atomic_file(self.directory / f"inputs-{i:05d}-{rank}.safetensors") as tmp:
                safetensors_file.write(tmp, tensors, {"block": str(i), "world": str(world)})
        self.ranks.barrier()  # every rank's batches are written before the block counts as finished
        if not self.ranks.main:
            return
        state, metadata = {}, {"record": json.dumps(record)}
        if block is not None:
            # adaptive layers with every level they know and the residuals they hold off the model
            layers = layer_entries(block, keep_spare=True)
            metadata["layers"] = json.dumps(layers)
            state = {k: v.detach().cpu().clone().contiguous() for k, v in block.state_dict().items()}
            state.update(spare_state(block, layers))
        with atomic.atomic_file(self._block_file(i)) as tmp:
            save_file(state, str(tmp), metadata=metadata)
        _write_json(self.directory / STATE, {"blocks": i + 1})
        for path in self.directory.glob("inputs-*-*.safetensors"):  # earlier blocks' inputs are no longer needed
            if int(path.name.split("-")[1]) < i:
                path.unlink(missing_ok=True)

    def restore(self, i: int, block: nn.Module) -> None:
        """Make block ``i`` what it was when it was recorded."""
        path = self._block_file(i)
        try:
            with safe_open(str(path), framework="pt") as f:
                layers = json.loads((f.metadata() or {})["layers"])
            state = load_file(str(path))

            def take(key: str) -> torch.Tensor:  # the residuals held aside are no part of the block's state
                return state.pop(key) if ".spare." in key else state[key]

            for name, entry in layers.items():
                install_layer(block, name, entry, take)
            # assign: a lazily loaded model's block is still empty (meta) and takes the tensors as they are
            block.load_state_dict(state, strict=True, assign=True)
        except (OSError, KeyError, ValueError, RuntimeError, SafetensorError) as e:
            raise AmpqError(f"the saved progress in {self.directory} is damaged ({' '.join(str(e).split())[:160]}); "
                            f"delete that folder and run again") from None

    def record(self, i: int) -> dict | None:
        """The JSON record saved with block ``i``."""
        try:
            with safe_open(str(self._block_file(i)), framework="pt") as f:
                return json.loads((f.metadata() or {})["record"])
        except (OSError, KeyError, ValueError, SafetensorError) as e:
            raise AmpqError(f"the saved progress in {self.directory} is damaged ({' '.join(str(e).split())[:160]}); "
                            f"delete that folder and run again") from None

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Keep a stage's own tensors (written before any block is recorded as finished)."""
        if not self.ranks.main:
            return
        data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        with atomic.atomic_file(self.directory / f"{name}.safetensors") as tmp:
            save_file(data, str(tmp))

    def tensors(self, name: str) -> dict[str, torch.Tensor] | None:
        """What :meth:`save_tensors` kept under ``name``, or None."""
        path = self.directory / f"{name}.safetensors"
        if not path.exists():
            return None
        try:
            return load_file(str(path))
        except (OSError, SafetensorError):
            return None  # written under a temporary name and renamed: damage means start the stage again

    def inputs(self) -> Iterator[tuple[int, safetensors_file.StoredTensor]]:
        """The recorded next-block inputs: (batch index among all ranks', where its bytes are), in
        order, from the files of one run that all reached the last finished block."""
        try:
            sets: dict[int, dict[int, dict]] = {}
            for path in sorted(self.directory.glob(f"inputs-{self.done - 1:05d}-*.safetensors")):
                stored, meta = safetensors_file.read_header(path)
                if meta.get("block") == str(self.done - 1):
                    sets.setdefault(int(meta["world"]), {})[int(path.stem.rpartition("-")[2])] = stored
            complete = [w for w, files in sets.items() if set(files) == set(range(w))]
            if not complete:
                raise OSError("no complete set of calibration inputs")
            batches = {int(k): t for files in sets[complete[0]].values() for k, t in files.items()}
            for k in sorted(batches):
                yield k, batches[k]
        except (OSError, safetensors_file.SafetensorsError) as e:
            raise AmpqError(f"the saved progress in {self.directory} is damaged ({' '.join(str(e).split())[:160]}); "
                            f"delete that folder and run again") from None

    def finish(self) -> None:
        self.ranks.barrier()
        if self.ranks.main:
            shutil.rmtree(self.directory, ignore_errors=True)
            self._unlock()


def _cpu(t):
    return t.detach().cpu() if isinstance(t, torch.Tensor) else t
