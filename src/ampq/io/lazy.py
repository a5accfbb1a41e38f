"""A model whose weights stay in their safetensors files until a part of it is needed.

The model is built on the meta device; :class:`LazyWeights` fills in one part (a decoder block,
the embeddings) with positioned reads from the shards, converted to the model's dtype, and can
empty it again. What is never filled (the unquantized embeddings and head) is streamed straight
from the source files into the output when the model is saved. This is what keeps ``ampq quantize
--max-memory`` within its cap: the whole model is never in memory at once.
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.io.config import empty_model, model_config
from ampq.io.safetensors_file import SafetensorsError, StoredTensor, read_header
from ampq.nn import QuantLinear

_ATTACHED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Converted:
    """A stored tensor as it would be in another dtype, streamed a chunk at a time."""

    def __init__(self, stored: StoredTensor, dtype: torch.dtype):
        self.stored, self.dtype, self.shape = stored, dtype, stored.shape

    def chunks(self) -> Iterator[torch.Tensor]:
        return self.stored.chunks(self.dtype)


def _slots(model: nn.Module) -> list[list[tuple[str, nn.Module, str]]]:
    """Each parameter or buffer with every (full name, owner module, attribute) that holds it:
    tied weights (the head sharing the embedding's) are one entry with two owners."""
    groups: dict[int, list] = {}
    for mname, module in model.named_modules(remove_duplicate=False):
        for attr, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is not None:
                groups.setdefault(id(t), []).append((f"{mname}.{attr}" if mname else attr, module, attr))
    return list(groups.values())


def _assign(owners, tensor: torch.Tensor) -> None:
    _, first, first_attr = owners[0]
    if first_attr in first._parameters:
        tensor = nn.Parameter(tensor, requires_grad=False)  # one object for every owner: ties stay ties
    for _, module, attr in owners:
        (module._parameters if attr in module._parameters else module._buffers)[attr] = tensor


class LazyWeights:
    """The tensors of a folder's safetensors shards, by name, read only when asked for."""

    def __init__(self, directory: str | Path, base_prefix: str = ""):
        self.directory = Path(directory)
        self.base_prefix = base_prefix
        shards = sorted(self.directory.glob("*.safetensors"))
        if not shards:
            raise AmpqError(f"{self.directory} has no .safetensors files; --max-memory reads weights from safetensors "
                            "(convert the checkpoint, or run without --max-memory)")
        self.stored: dict[str, StoredTensor] = {}
        for shard in shards:
            try:
                self.stored.update(read_header(shard)[0])
            except (OSError, SafetensorsError) as e:
                raise AmpqError(f"cannot read {shard} ({e}); re-download or re-convert the model") from None

    def key(self, name: str) -> str | None:
        """The stored name of the model's tensor ``name`` (checkpoints of the bare model lack the
        causal-LM wrapper's prefix)."""
        if name in self.stored:
            return name
        prefix = f"{self.base_prefix}." if self.base_prefix else ""
        if prefix and name.startswith(prefix) and name[len(prefix):] in self.stored:
            return name[len(prefix):]
        return None

    def _source(self, owners) -> StoredTensor | None:
        for name, _, _ in owners:
            if (key := self.key(name)) is not None:
                return self.stored[key]
        return None

    def check(self, model: nn.Module) -> None:
        """Every tensor the model lacks is stored, with its shape; fail before any work otherwise."""
        for owners in _slots(model):
            name, module, attr = owners[0]
            t = getattr(module, attr)
            if t.device.type != "meta":
                continue
            stored = self._source(owners)
            if stored is None:
                raise AmpqError(f"{self.directory} stores no tensor {name}: this checkpoint's tensor names differ from "
                                "the model's modules, which --max-memory needs; run without --max-memory")
            if tuple(stored.shape) != tuple(t.shape):
                raise AmpqError(f"{self.directory}: tensor {name} is stored as {list(stored.shape)}, the model needs "
                                f"{list(t.shape)}; the checkpoint does not match its config.json")

    def materialize(self, model: nn.Module, wanted: Callable[[str], bool]) -> None:
        """Read every still-empty tensor whose name ``wanted`` accepts, in the model's dtype."""
        for owners in _slots(model):
            t = getattr(owners[0][1], owners[0][2])
            if t.device.type == "meta" and any(wanted(name) for name, _, _ in owners):
                stored = self._source(owners)
                try:
                    _assign(owners, stored.read(t.dtype))
                except (OSError, SafetensorsError) as e:
                    raise AmpqError(f"cannot read {owners[0][0]} from {stored.path} ({e}); the file changed or was "
                                    "damaged after loading began") from None

    def release(self, model: nn.Module, wanted: Callable[[str], bool]) -> None:
        """Empty again the stored tensors ``wanted`` accepts (never a quantized layer's): the caller
        knows they are unchanged, so they can be read again."""
        for owners in _slots(model):
            t = getattr(owners[0][1], owners[0][2])
            if (t.device.type != "meta" and any(wanted(name) for name, _, _ in owners)
                    and not any(isinstance(m, QuantLinear) for _, m, _ in owners)
                    and self._source(owners) is not None):
                _assign(owners, torch.empty_like(t, device="meta"))

    def empty_tensors(self, model: nn.Module) -> dict[str, tuple[StoredTensor, torch.dtype]]:
        """Each tensor the model still lacks, under every name it has (a tied head's too): where it
        is stored and the dtype the model wants it in."""
        out = {}
        for owners in _slots(model):
            t = getattr(owners[0][1], owners[0][2])
            if t.device.type == "meta" and (stored := self._source(owners)) is not None:
                out.update({name: (stored, t.dtype) for name, _, _ in owners})
        return out


def sample(stored: StoredTensor, dtype: torch.dtype, step: int) -> torch.Tensor:
    """Every ``step``-th element of a stored tensor in ``dtype``, read a chunk at a time."""
    parts, start = [], 0
    for chunk in stored.chunks(dtype):
        parts.append(chunk[(-start) % step::step].clone())  # a view would keep the whole chunk
        start += chunk.numel()
    return torch.cat(parts) if parts else torch.empty(0, dtype=dtype)


def attach(model: nn.Module, weights: LazyWeights) -> nn.Module:
    _ATTACHED[model] = weights
    return model


def weights_of(model: nn.Module) -> LazyWeights | None:
    """The lazy weights behind ``model``, if it was loaded with ``lazy=True``."""
    return _ATTACHED.get(model)


def lazy_model(path: Path, dtype: torch.dtype) -> nn.Module:
    """The model in folder ``path``, built on the meta device, with its weights left on disk."""
    config = model_config(path)
    model = empty_model(path, config, dtype)
    model.tie_weights()  # from_pretrained ties after loading; the head must share the embedding's slot here
    weights = LazyWeights(path, getattr(model, "base_model_prefix", ""))
    weights.check(model)
    if (path / "generation_config.json").exists():
        from transformers import GenerationConfig  # here: ``import ampq`` does not import transformers

        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except (OSError, ValueError, json.JSONDecodeError):
            pass  # a broken generation config does not stop quantization; the model loads without it
    model.eval().requires_grad_(False)
    return attach(model, weights)
