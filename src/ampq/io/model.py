"""Saving and loading whole quantized models on top of the verified checkpoint layer."""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.io.checkpoint import read_checkpoint, write_checkpoint
from ampq.models import replace_module, tied_embeddings
from ampq.nn import QuantLinear

MANIFEST_FORMAT = "ampq-checkpoint/1"


def _version() -> str:
    from ampq import __version__

    return __version__


def _layer_entry(m: QuantLinear) -> dict:
    return {"format": m.format_name, "algorithm": m.algorithm, "shape": list(m.shape),
            "tensors": list(m.stored_names), "bias": m.bias is not None,
            "activation": m.activation, "input_scale": m.input_scale is not None,
            "input_perm": m.input_perm is not None,
            "compute_dtype": m.compute_dtype,
            "bytes": m.nbytes(), "bits_per_weight": 8 * m.nbytes() / (m.shape[0] * m.shape[1])}


def _layer_entries(model: nn.Module) -> dict[str, dict]:
    from ampq.nested import NestedLinear
    from ampq.nn import quantized_linears

    layers = {}
    for name, m in quantized_linears(model).items():
        if isinstance(m, NestedLinear):
            # the base's entry, under the prefix "base", plus what each stored level adds
            weights = m.shape[0] * m.shape[1]
            layers[name] = {**_layer_entry(m.base), "nested": {
                "residuals": [{"format": r.format_name, "tensors": list(r.stored_names)} for r in m.residuals],
                "damage": m.damage[: m.level + 1] if m.damage else None},
                "bytes": m.nbytes(), "bits_per_weight": 8 * m.nbytes() / weights}
        else:
            layers[name] = _layer_entry(m)
    return layers


def _tokenizer_files(tokenizer) -> dict[str, bytes]:
    if tokenizer is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in Path(tmp).iterdir() if p.is_file()}


def save(model: nn.Module, directory: str | Path, tokenizer=None, *, overwrite: bool = False,
         extra_manifest: dict | None = None) -> Path:
    """Write ``model`` (quantized or not) as safetensors shards, its HF config and tokenizer, and a
    manifest with each layer's format and every tensor's SHA-256. Atomic: a crash leaves nothing
    that looks like a checkpoint."""
    tied = tied_embeddings(model)
    state = model.state_dict()
    if tied:
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{head}.weight", None)
    from ampq.io.lazy import Converted, weights_of

    # a lazily loaded model's tensors that were never needed are copied from its files as they stream
    weights = weights_of(model)
    empty = weights.empty_tensors(model) if weights is not None else {}
    tensors = {k: Converted(*empty[k]) if k in empty else v.detach().cpu() for k, v in state.items()}
    layers = _layer_entries(model)
    manifest = {
        "format": MANIFEST_FORMAT,
        "ampq_version": _version(),
        "source": getattr(model.config, "ampq_source", None),
        "architectures": getattr(model.config, "architectures", None),
        "tied_embeddings": tied,
        "layers": layers,
        **(extra_manifest or {}),
    }
    from ampq.hf import config_json

    # config.json carries quantization_config (quant_method "ampq" + the layer table) so that
    # transformers' from_pretrained loads the folder after `import ampq` (see ampq.hf)
    extra = {"config.json": config_json(model).encode()}
    if getattr(model, "generation_config", None) is not None:
        extra["generation_config.json"] = model.generation_config.to_json_string().encode()
    extra.update(_tokenizer_files(tokenizer))
    return write_checkpoint(directory, tensors, manifest, extra, overwrite=overwrite)


_MAX_CONFIG_INT = 1 << 24  # no real config has a width, depth or vocabulary this large
_BLOCK_INDEX = re.compile(r"\.(\d+)\.")


def _check_config(directory, config, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a config.json that would build something the stored tensors cannot fill, before it
    is built: a hostile one could otherwise ask for a billion layers or a huge buffer."""
    def walk(obj, path):
        items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for k, v in items:
            if isinstance(v, bool):
                continue
            if isinstance(v, int) and not -_MAX_CONFIG_INT <= v <= _MAX_CONFIG_INT:
                raise AmpqError(f"{directory}/config.json has an implausible {path}{k} = {v}; "
                                "the checkpoint is damaged or not from ampq")
            if isinstance(v, (dict, list)):
                walk(v, f"{path}{k}.")

    walk(config.to_dict(), "")
    depth = getattr(config, "num_hidden_layers", None)
    blocks = 1 + max((int(m.group(1)) for n in tensors for m in _BLOCK_INDEX.finditer(n)), default=-1)
    if isinstance(depth, int) and depth > blocks:
        raise AmpqError(f"{directory}/config.json asks for {depth} layers but the checkpoint holds tensors for "
                        f"{blocks}; it does not match its tensors")


def _check_layer(name: str, entry, module, stored: dict[str, torch.Tensor]) -> None:
    """A manifest's layer entry must agree with the module the config built and the bytes stored."""
    from ampq.formats import get_format

    if not (isinstance(entry, dict) and isinstance(entry.get("format"), str) and isinstance(entry.get("shape"), list)
            and len(entry["shape"]) == 2 and all(type(v) is int and v > 0 for v in entry["shape"])):
        raise ValueError("malformed entry")
    if not isinstance(module, nn.Linear) or module.weight.shape != tuple(entry["shape"]):
        raise ValueError(f"the model has no {entry['shape'][0]}x{entry['shape'][1]} linear there")
    expected = get_format(entry["format"]).nbytes(tuple(entry["shape"]))
    held = sum(t.numel() * t.element_size() for t in stored.values())
    if held != expected:
        raise ValueError(f"{entry['format']} needs {expected} bytes, the checkpoint holds {held}")


def _quant_linear(name: str, entry: dict, module, tensors: dict[str, torch.Tensor]) -> QuantLinear:
    stored = {k: tensors.pop(f"{name}.{k}") for k in entry["tensors"]}
    _check_layer(name, entry, module, stored)
    bias = tensors.pop(f"{name}.bias") if entry.get("bias") else None
    input_scale = tensors.pop(f"{name}.input_scale") if entry.get("input_scale") else None
    input_perm = tensors.pop(f"{name}.input_perm") if entry.get("input_perm") else None
    out_f, in_f = entry["shape"]
    return QuantLinear(in_f, out_f, entry["format"], stored, bias, entry.get("algorithm", "rtn"),
                       entry.get("activation"), input_scale, entry.get("compute_dtype"), input_perm)


def _nested_linear(name: str, entry: dict, nested, base: QuantLinear, module, tensors, directory: Path, entries):
    from ampq.nested import NestedLinear

    if not isinstance(nested, dict) or not isinstance(nested.get("residuals"), list):
        raise ValueError("malformed nested entry")
    residuals = []
    for i, r in enumerate(nested["residuals"]):
        if not isinstance(r, dict) or not isinstance(r.get("format"), str) or not isinstance(r.get("tensors"), list):
            raise ValueError(f"malformed residual {i + 1}")
        residuals.append(_quant_linear(f"{name}.residuals.{i}", {**r, "shape": entry["shape"]}, module, tensors))
    damage = nested.get("damage")
    if damage is not None and not (isinstance(damage, list) and len(damage) == len(residuals) + 1
                                   and all(isinstance(d, (int, float)) for d in damage)):
        raise ValueError("malformed damage list")
    layer = NestedLinear(base, [r.format_name for r in residuals], residuals, damage)
    layer.__dict__["_source"] = (directory, name, entries)
    return layer


def load(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save` from its folder alone, after verifying every hash.
    A folder another tool quantized (GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit; see
    :mod:`ampq.importers`) loads too, each layer in the ampq format that holds it exactly."""
    from ampq import importers

    if not (Path(directory) / "ampq.json").exists() and importers.quant_method(directory) in importers.LAYOUTS:
        model, notes = importers.load_foreign(directory)
        for line in notes:
            warnings.warn(line, stacklevel=2)
        return model.to(device)
    tensors, manifest = read_checkpoint(directory)
    if manifest.get("format") != MANIFEST_FORMAT:
        raise AmpqError(f"{directory}/ampq.json has format {manifest.get('format')!r}, not {MANIFEST_FORMAT!r}; "
                        "it was written by another tool or a newer ampq")
    layers = manifest.get("layers", {})
    if not isinstance(layers, dict):
        raise AmpqError(f"{directory}/ampq.json has a malformed 'layers' table; re-create the checkpoint")
    # the quantization_config ampq.save writes is for transformers' from_pretrained (ampq.hf); the
    # manifest is what this loader follows, so the model is built without it
    config = model_config(directory)
    _check_config(directory, config, tensors)
    # the model's dtype is that of its unquantized tensors: quantized layers' fp16 scales outnumber
    # them and would make a float32 model float16
    inside = tuple(f"{name}." for name in layers)
    floats = [t.dtype for n, t in tensors.items()
              if t.is_floating_point() and t.dtype.itemsize >= 2 and not n.startswith(inside)]
    dtype = max(set(floats), key=floats.count) if floats else torch.float32
    model = empty_model(directory, config, dtype)
    for name, entry in layers.items():
        try:
            nested = entry.get("nested") if isinstance(entry, dict) else None
            module = model.get_submodule(name)
            layer = _quant_linear(f"{name}.base" if nested is not None else name, entry, module, tensors)
            if nested is not None:
                layer = _nested_linear(name, entry, nested, layer, module, tensors, Path(directory),
                                       manifest["tensors"])
            replace_module(model, name, layer)
        except (KeyError, AttributeError, ValueError, TypeError, AmpqError) as e:
            raise AmpqError(f"{directory}: layer {name!r} in ampq.json does not match the stored tensors "
                            f"({_first_line(e)})") from None
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise AmpqError(f"checkpoint {directory} does not match its config.json ({_first_line(e)})") from None
    if manifest.get("tied_embeddings"):
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing or result.unexpected_keys:
        problem = f"lacks {missing[0]}" if missing else f"has unexpected tensor {result.unexpected_keys[0]}"
        raise AmpqError(f"checkpoint {directory} {problem}; it does not match its config.json")
    model.config.ampq_source = manifest.get("source")
    model.eval().requires_grad_(False)
    return model.to(device)


def model_config(directory) -> object:
    """The folder's config.json as transformers reads it, without a quantization_config: ampq's
    loaders build the model and put the quantized layers in themselves."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as e:  # noqa: BLE001 - whatever a config file makes transformers raise
        raise AmpqError(f"{directory}/config.json is not a usable model config ({_first_line(e)})") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return config


def empty_model(directory, config, dtype: torch.dtype) -> nn.Module:
    """The model ``config`` describes, with every weight on the meta device (no memory)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    try:
        with init_empty_weights():
            return AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:  # noqa: BLE001
        raise AmpqError(f"{directory}/config.json does not describe a model transformers can build ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text or type(e).__name__)[:200]
