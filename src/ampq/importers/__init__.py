"""Loading checkpoints that other tools quantized (GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit)
as ampq models: each quantized linear becomes a QuantLinear of the ampq format that decodes to the
same weight, so ``ampq eval``, ``bench``, ``save`` and ``export`` work on them unchanged.

Adding a layout is one module with ``QUANT_METHOD`` and ``convert(prefix, take, qconfig, linear,
notes)`` (a QuantLinear, or None where the linear is not quantized) plus one line in ``LAYOUTS``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ampq.errors import AmpqError, first_line
from ampq.expert_names import from_hub, hub_experts
from ampq.importers import awq, bnb, compressed_tensors, gptq
from ampq.importers.common import Notes
from ampq.importers.experts import read_experts
from ampq.io.config import empty_model, model_config
from ampq.models import replace_module

LAYOUTS = {m.QUANT_METHOD: m for m in (gptq, awq, compressed_tensors, bnb)}
MAX_CONFIG_BYTES = 16 << 20


def quant_method(directory: str | Path) -> str | None:
    """The ``quant_method`` of a Hugging Face folder's config.json, or None (not quantized, or no config)."""
    path = Path(directory) / "config.json"
    if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
        return None
    try:
        qc = json.loads(path.read_text()).get("quantization_config")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    return str(qc.get("quant_method", "")).lower() or None if isinstance(qc, dict) else None


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted({directory / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError, AttributeError):
            raise AmpqError(f"{index} is not a valid safetensors index; download it again") from None
        if any(not f.is_file() or f.parent != directory for f in files):
            raise AmpqError(f"{index} names shards that are not in {directory}; the download is incomplete")
    else:  # one file, whatever its name (AutoGPTQ wrote gptq_model-4bit-128g.safetensors)
        files = sorted(directory.glob("*.safetensors"))
    if not files:
        bins = sorted(directory.glob("*.bin")) + sorted(directory.glob("*.pt"))
        hint = " (it holds pickle files, which ampq does not load: they can run code)" if bins else ""
        raise AmpqError(f"{directory} has no .safetensors files{hint}; ampq imports safetensors checkpoints")
    tensors = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for key in st.keys():
                    tensors[key] = st.get_tensor(key).clone()
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise AmpqError(f"{f} is not a readable safetensors file ({' '.join(str(e).split())[:160]}); "
                            "download it again") from None
    return tensors


def load_foreign(directory: str | Path, dtype: torch.dtype | None = None) -> tuple[nn.Module, list[str]]:
    """(model, notes) for a folder quantized by another tool. Unquantized tensors load in ``dtype``
    (default: the dtype they are stored in); notes list every conversion that was not exact (empty:
    bit for bit)."""
    directory = Path(directory)
    method = quant_method(directory)
    layout = LAYOUTS.get(method or "")
    if layout is None:
        raise AmpqError(f"{directory}: quant_method {method!r} is not one ampq imports "
                        f"({', '.join(LAYOUTS)}); load it with its own tool or give the unquantized model")
    qconfig = json.loads((directory / "config.json").read_text())["quantization_config"]
    config = model_config(directory)
    tensors = _read_tensors(directory)
    dtype = dtype or _stored_dtype(tensors)
    model = empty_model(directory, config, dtype)
    notes, converted = Notes(), []
    naming = hub_experts(getattr(config, "model_type", None))
    if naming is not None:
        try:
            converted += read_experts(model, tensors, naming,
                                      lambda prefix, take, linear: layout.convert(prefix, take, qconfig, linear, notes))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise AmpqError(f"{directory}: experts cannot be read as {method} ({first_line(e)})") from None
        tensors = {from_hub(k, naming): v for k, v in tensors.items()}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        plain = tensors.get(f"{name}.weight")
        if plain is not None and plain.is_floating_point() and plain.dtype.itemsize >= 2:
            continue

        def take(key, peek=False, _name=name):
            full = f"{_name}.{key}"
            return tensors.get(full) if peek else tensors.pop(full, None)

        try:
            layer = layout.convert(name, take, qconfig, module, notes)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise AmpqError(f"{directory}: layer {name!r} cannot be read as {method} ({first_line(e)})") from None
        if layer is None:
            continue
        if layer.bias is not None:
            layer.bias.data = layer.bias.data.to(dtype)
        replace_module(model, name, layer)
        converted.append(name)
    if not converted:
        raise AmpqError(f"{directory}: config.json says {method} but no layer holds {method} tensors; "
                        "the folder does not match its config")
    leftovers = [k for k in tensors if any(k.startswith(f"{n}.") for n in converted)]
    if leftovers:
        raise AmpqError(f"{directory}: tensor {leftovers[0]!r} of a quantized layer is not part of the {method} "
                        "layout ampq reads; this variant is not supported")
    rest = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}
    try:
        result = model.load_state_dict(rest, strict=False, assign=True)
    except RuntimeError as e:
        raise AmpqError(f"{directory}: the tensors do not match config.json ({first_line(e)})") from None
    if getattr(config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None \
            and isinstance(model.get_output_embeddings(), nn.Linear):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise AmpqError(f"{directory} lacks {missing[0]}; the checkpoint does not match its config.json")
    if result.unexpected_keys:
        notes.append(f"ignored {len(result.unexpected_keys)} tensors the model has no place for "
                     f"(first: {result.unexpected_keys[0]})")
    model.config.ampq_source = str(directory)
    model.eval().requires_grad_(False)
    return model, list(notes)


def _stored_dtype(tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of the checkpoint's floats are stored in (by count of numbers: the embedding
    outweighs the many small float32 quantization parameters)."""
    counts: dict[torch.dtype, int] = {}
    for t in tensors.values():
        if t.is_floating_point() and t.dtype.itemsize >= 2:
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32
