"""Saving and loading whole ampq checkpoints on top of the verified checkpoint layer: the model's
tensors, its layer table (:mod:`ampq.layer_table`) and its HF config. Checkpoints of other tools
load through :func:`ampq.loading.load`."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ampq import layer_table
from ampq.coverage import coverage
from ampq.errors import AmpqError, first_line
from ampq.io.checkpoint import read_checkpoint, write_checkpoint
from ampq.io.config import empty_model, model_config, transformers_class
from ampq.io.lazy import Converted, weights_of
from ampq.io.residuals import CheckpointResiduals
from ampq.models import lm_head_name, tied_embeddings
from ampq.quant_embedding import TiedQuantHead
from ampq.version import __version__

MANIFEST_FORMAT = "ampq-checkpoint/1"


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
        state.pop(f"{lm_head_name(model)}.weight", None)
    # a lazily loaded model's tensors that were never needed are copied from its files as they stream
    weights = weights_of(model)
    empty = weights.empty_tensors(model) if weights is not None else {}
    tensors = {k: Converted(*empty[k]) if k in empty else v.detach().cpu() for k, v in state.items()}
    layers = layer_table.layer_entries(model)
    # the class the model is rebuilt as: an encoder must not come back as a causal LM, nor a
    # vision-language model without its vision tower; config.json says the same, as save_pretrained's does
    cls = type(model).__name__ if transformers_class(type(model).__name__) is type(model) else None
    if cls is not None:
        model.config.architectures = [cls]
    manifest = {
        "format": MANIFEST_FORMAT,
        "ampq_version": __version__,
        "source": getattr(model.config, "ampq_source", None),
        "architectures": getattr(model.config, "architectures", None),
        "model_class": cls,
        "tied_embeddings": tied,
        "layers": layers,
        "coverage": coverage(model).to_dict(),
        **(extra_manifest or {}),
    }
    # config.json carries quantization_config (quant_method "ampq" + the layer table) so that
    # transformers' from_pretrained loads the folder after `import ampq` (see ampq.hf)
    extra = {"config.json": layer_table.config_json(model).encode()}
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


def load(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`save` from its folder alone, after verifying every hash."""
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
    dtype = layer_table.unquantized_dtype(tensors, layers) or torch.float32
    model = empty_model(directory, config, dtype, manifest.get("model_class"))
    for name, entry in layers.items():
        try:
            source = CheckpointResiduals(directory, name, manifest["tensors"])
            layer_table.install_layer(model, name, entry, tensors.pop, source)
        except (KeyError, AttributeError, ValueError, TypeError, AmpqError) as e:
            raise AmpqError(f"{directory}: layer {name!r} in ampq.json does not match the stored tensors "
                            f"({first_line(e)})") from None
    try:
        result = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise AmpqError(f"checkpoint {directory} does not match its config.json ({first_line(e)})") from None
    if manifest.get("tied_embeddings"):
        table = model.get_input_embeddings()
        if getattr(table, "is_quantized_embedding", False):  # the head reads the same stored table
            model.set_output_embeddings(TiedQuantHead(table))
        else:
            model.get_output_embeddings().weight = table.weight
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing or result.unexpected_keys:
        problem = f"lacks {missing[0]}" if missing else f"has unexpected tensor {result.unexpected_keys[0]}"
        raise AmpqError(f"checkpoint {directory} {problem}; it does not match its config.json")
    model.config.ampq_source = manifest.get("source")
    model.eval().requires_grad_(False)
    return model.to(device)
