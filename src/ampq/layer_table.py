"""The layer table: the one owner of the record that says what each quantized linear is.

A record is a JSON object: the format, the algorithm, the shape (out, in), the names of the stored
tensors, whether there is a bias, the activation treatment, AWQ's input scale, the act-order input
permutation, the compute dtype and, for an adaptive layer (:class:`ampq.nested.NestedLinear`), its
residual levels under ``nested``. A mixture-of-experts projection (``mlp.experts.gate_up_proj``,
one 3D weight) is one record of ``kind`` "experts": the same keys describe each expert's (out, in)
matrix, ``experts`` says how many there are, and ``expert_algorithms`` the algorithm of each where
they differ (GPTQ with a fallback to RTN for experts calibration reached too little). A quantized
token table (:class:`ampq.quant_embedding.QuantEmbedding`) is a record of ``kind`` "embedding", its
shape (vocabulary, width). The same record is the entry of ``ampq.json``'s ``layers``, of
config.json's ``quantization_config`` (which transformers' loader reads, :mod:`ampq.hf`) and of a
resumable run's block files (:mod:`ampq.resume`). This module writes records from modules, checks
them, and builds modules from them, given a way to take each stored tensor by name; where the
tensors come from (a checkpoint, safetensors headers, saved progress) is the caller's business.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ampq.experts import is_experts
from ampq.formats import get_format
from ampq.models import replace_module
from ampq.nested import NestedLinear, ResidualSource
from ampq.nested_experts import summed_damage
from ampq.nn import QuantLinear, quantized_linears
from ampq.quant_embedding import QuantEmbedding, quantized_embeddings
from ampq.quant_experts import QuantExperts, quantized_projections

QUANT_METHOD = "ampq"  # config.json's quantization_config.quant_method for ampq checkpoints
CONFIG_VERSION = 1
# what a record carries that a loader needs (bytes and bits_per_weight are reports)
LOADER_KEYS = ("format", "algorithm", "shape", "tensors", "bias", "activation", "input_scale", "compute_dtype",
               "input_perm", "kind", "experts", "expert_algorithms")
EXPERTS = "experts"  # the kind of a record that describes a stack of expert matrices
EMBEDDING = "embedding"  # the kind of a record that describes a quantized token table (shape: vocabulary, width)

Take = Callable[[str], torch.Tensor]  # a stored tensor by its full name (model.layers.0.mlp.up_proj.codes)


# ---- writing -----------------------------------------------------------------------------------
def layer_entry(layer: nn.Module, keep_spare: bool = False) -> dict:
    """The record of one QuantLinear or NestedLinear. With ``keep_spare`` an adaptive layer's record
    also lists every level it knows and the residuals it holds off the model (what a resumed run
    needs to continue exactly; a checkpoint stores only the levels on the model)."""
    if not isinstance(layer, NestedLinear):
        return _plain_entry(layer)
    nested = {"residuals": [_residual_entry(r) for r in layer.residuals],
              "damage": layer.damage[: layer.level + 1] if layer.damage else None}
    if keep_spare:
        nested.update(formats=list(layer.residual_formats), damage=layer.damage,
                      spare={str(k): _residual_entry(r) for k, r in layer.spare.items()})
    weights = layer.shape[0] * layer.shape[1]
    # the base's record (its tensors under the prefix "base"), plus what each stored level adds
    return {**_plain_entry(layer.base), "nested": nested,
            "bytes": layer.nbytes(), "bits_per_weight": 8 * layer.nbytes() / weights}


def _plain_entry(m: QuantLinear) -> dict:
    return {"format": m.format_name, "algorithm": m.algorithm, "shape": list(m.shape),
            "tensors": list(m.stored_names), "bias": m.bias is not None,
            "activation": m.activation, "input_scale": m.input_scale is not None,
            "input_perm": m.input_perm is not None,
            "compute_dtype": m.compute_dtype,
            "bytes": m.nbytes(), "bits_per_weight": 8 * m.nbytes() / (m.shape[0] * m.shape[1])}


def _residual_entry(r: QuantLinear) -> dict:
    return {"format": r.format_name, "tensors": list(r.stored_names)}


def experts_entry(experts: QuantExperts, name: str, keep_spare: bool = False) -> dict:
    """The record of one quantized expert projection: its first expert's, for all of them. An
    adaptive projection (every expert a NestedLinear, all at one level) records the levels as an
    adaptive linear does, with the damage summed over the experts and each expert's own under
    ``expert_damage``."""
    layers = experts.quantized(name)
    algorithms = [m.algorithm for m in layers]
    nbytes, weights = experts.nbytes(name), len(layers) * layers[0].shape[0] * layers[0].shape[1]
    first = layers[0]
    entry = {**_plain_entry(first.base if isinstance(first, NestedLinear) else first), "kind": EXPERTS,
             "experts": len(layers), "bytes": nbytes, "bits_per_weight": 8 * nbytes / weights}
    if len(set(algorithms)) > 1:
        entry["expert_algorithms"] = algorithms
    if isinstance(first, NestedLinear):
        damage = summed_damage(layers, first.levels if keep_spare else first.level + 1)
        nested = {"residuals": [_residual_entry(r) for r in first.residuals], "damage": damage,
                  "expert_damage": [list(m.damage[:len(damage)]) for m in layers] if damage else None}
        if keep_spare:
            nested.update(formats=list(first.residual_formats),
                          spare={str(k): _residual_entry(r) for k, r in first.spare.items()})
        entry["nested"] = nested
    return entry


def layer_entries(model: nn.Module, keep_spare: bool = False) -> dict[str, dict]:
    """The record of every quantized linear and expert projection of ``model``, by name."""
    entries = {name: layer_entry(m, keep_spare) for name, m in quantized_linears(model).items()}
    entries.update({name: experts_entry(m, p, keep_spare) for name, (m, p) in quantized_projections(model).items()})
    entries.update({name: {**_plain_entry(m), "kind": EMBEDDING} for name, m in quantized_embeddings(model).items()})
    return entries


def loader_entries(entries: dict[str, dict]) -> dict[str, dict]:
    """``entries`` with only what a loader reads: config.json's copy of the table."""
    layers = {}
    for name, entry in entries.items():
        out = {k: entry[k] for k in LOADER_KEYS if k in entry}
        nested = entry.get("nested")
        if nested is not None:
            out["nested"] = {"residuals": [_residual_entry_of(r) for r in nested["residuals"]],
                             "damage": nested.get("damage")}
            if "expert_damage" in nested:
                out["nested"]["expert_damage"] = nested["expert_damage"]
        layers[name] = out
    return layers


def _residual_entry_of(record: dict) -> dict:
    return {"format": record["format"], "tensors": list(record["tensors"])}


def unquantized_dtype(tensors: dict[str, torch.Tensor], layer_names: Iterable[str]) -> torch.dtype | None:
    """The dtype of the tensors outside the quantized layers (embeddings, norms), the most common
    by count of tensors: what a loader builds the model in. The quantized layers' fp16 scales
    would outnumber them and make a float32 model float16; None where there is no such tensor."""
    inside = tuple(f"{name}." for name in layer_names)
    floats = [t.dtype for n, t in tensors.items()
              if t.is_floating_point() and t.dtype.itemsize >= 2 and not n.startswith(inside)]
    return Counter(floats).most_common(1)[0][0] if floats else None


def quantization_config(model: nn.Module) -> dict | None:
    """config.json's ``quantization_config`` for ``model``: quant_method "ampq" and the layer table;
    None for a model without quantized linears."""
    entries = layer_entries(model)
    if not entries:
        return None
    dtype = unquantized_dtype(model.state_dict(), entries)
    return {"quant_method": QUANT_METHOD, "version": CONFIG_VERSION,
            "dtype": str(dtype).removeprefix("torch.") if dtype is not None else None,
            "layers": loader_entries(entries)}


def config_json(model: nn.Module) -> str:
    """``model.config.to_json_string()`` with ``quantization_config`` set from the model: the ampq
    layer table where it has quantized linears; otherwise an ampq one left over is dropped (another
    tool's is kept as it is)."""
    config = json.loads(model.config.to_json_string())
    qc = quantization_config(model)
    if qc is not None:
        config["quantization_config"] = qc
    elif isinstance(config.get("quantization_config"), dict) and \
            config["quantization_config"].get("quant_method") == QUANT_METHOD:
        del config["quantization_config"]
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


# ---- checking ----------------------------------------------------------------------------------
def check_entry(entry) -> None:
    """Raise ValueError naming what is malformed in a record read from a file."""
    if not (isinstance(entry, dict) and isinstance(entry.get("format"), str) and _is_shape(entry.get("shape"))
            and _are_names(entry.get("tensors"))):
        raise ValueError("malformed entry")
    nested = entry.get("nested")
    if entry.get("kind", EXPERTS) not in (EXPERTS, EMBEDDING):
        raise ValueError(f"unknown kind of layer {entry['kind']!r}")
    if entry.get("kind") == EMBEDDING and (nested is not None or entry.get("bias") or entry.get("input_scale")
                                           or entry.get("input_perm") or entry.get("activation")):
        raise ValueError("malformed embedding entry")
    if entry.get("kind") == EXPERTS:
        count = entry.get("experts")
        algorithms = entry.get("expert_algorithms")
        if type(count) is not int or count <= 0 or not (
                algorithms is None or (_are_names(algorithms) and len(algorithms) == count)):
            raise ValueError("malformed experts entry")
        per_expert = nested.get("expert_damage") if isinstance(nested, dict) else None
        if per_expert is not None and not (isinstance(per_expert, list) and len(per_expert) == count and all(
                isinstance(d, list) and len(d) == len(nested.get("damage") or []) for d in per_expert)):
            raise ValueError("malformed expert damage")
    if nested is None:
        return
    if not isinstance(nested, dict) or not isinstance(nested.get("residuals"), list):
        raise ValueError("malformed nested entry")
    for i, r in enumerate(nested["residuals"]):
        if not _is_residual(r):
            raise ValueError(f"malformed residual {i + 1}")
    formats = nested.get("formats", [r["format"] for r in nested["residuals"]])
    if not (isinstance(formats, list) and all(isinstance(f, str) for f in formats)
            and len(formats) >= len(nested["residuals"])):
        raise ValueError("malformed list of residual formats")
    damage = nested.get("damage")
    if damage is not None and not (isinstance(damage, list) and len(damage) in (len(nested["residuals"]) + 1,
                                                                                len(formats) + 1)
                                   and all(isinstance(d, (int, float)) for d in damage)):
        raise ValueError("malformed damage list")
    spare = nested.get("spare", {})
    if not (isinstance(spare, dict) and all(k.isdigit() and 0 < int(k) <= len(formats) and _is_residual(r)
                                            for k, r in spare.items())):
        raise ValueError("malformed spare residuals")


def _is_shape(shape) -> bool:
    return isinstance(shape, list) and len(shape) == 2 and all(type(v) is int and v > 0 for v in shape)


def _are_names(tensors) -> bool:
    return isinstance(tensors, list) and all(isinstance(t, str) for t in tensors)


def _is_residual(r) -> bool:
    return isinstance(r, dict) and isinstance(r.get("format"), str) and _are_names(r.get("tensors"))


# ---- building ----------------------------------------------------------------------------------
def install_layer(root: nn.Module, name: str, entry: dict, take: Take, source: ResidualSource | None = None) -> None:
    """Put the module ``entry`` describes in ``root`` at ``name`` (see :func:`build_layer`); an
    experts record makes its experts module a :class:`QuantExperts` (once, for all its projections)
    and stores that projection quantized."""
    if entry.get("kind") == EMBEDDING:
        replace_module(root, name, build_embedding(name, entry, root.get_submodule(name), take))
        return
    if entry.get("kind") != EXPERTS:
        replace_module(root, name, build_layer(name, entry, root.get_submodule(name), take, source))
        return
    check_entry(entry)
    owner, _, projection = name.rpartition(".")
    experts = root.get_submodule(owner)
    if not getattr(experts, "is_quantized_experts", False):
        if not is_experts(experts):
            raise ValueError("the model has no experts module there")
        experts = QuantExperts(experts)
        replace_module(root, owner, experts)
    shape = tuple(entry["shape"])
    if projection not in experts.names or experts.shapes[projection] != shape or experts.num_experts != entry["experts"]:
        raise ValueError(f"the model has no {entry['experts']} experts of {shape[0]}x{shape[1]} there")
    algorithms = entry.get("expert_algorithms") or [entry.get("algorithm") or "rtn"] * entry["experts"]
    nested = entry.get("nested")
    if nested is None:
        experts.set_quantized(projection, [_quant_linear(f"{name}.{e}", {**entry, "algorithm": a}, take)
                                           for e, a in enumerate(algorithms)])
        return
    damage = nested.get("expert_damage") or [None] * entry["experts"]
    experts.set_quantized(projection, [
        _nested_layer(f"{name}.{e}", {**entry, "algorithm": a}, take, source.part(str(e)) if source else None, damage[e])
        for e, a in enumerate(algorithms)])


def build_layer(name: str, entry: dict, linear: nn.Module, take: Take,
                source: ResidualSource | None = None) -> nn.Module:
    """The module ``entry`` describes, to take the place of ``linear`` (module ``name``), with each
    stored tensor from ``take``; an adaptive layer reads its missing levels from ``source``.
    Raises ValueError (or ``take``'s KeyError) where the record, the model and the tensors disagree."""
    check_entry(entry)
    shape = tuple(entry["shape"])
    if not isinstance(linear, nn.Linear) or tuple(linear.weight.shape) != shape:
        raise ValueError(f"the model has no {shape[0]}x{shape[1]} linear there")
    if entry.get("nested") is None:
        return _quant_linear(name, entry, take)
    return _nested_layer(name, entry, take, source, entry["nested"].get("damage"))


def _nested_layer(name: str, entry: dict, take: Take, source: ResidualSource | None, damage) -> NestedLinear:
    nested = entry["nested"]
    base = _quant_linear(f"{name}.base", entry, take)
    residuals = [_quant_linear(f"{name}.residuals.{i}", {**r, "shape": entry["shape"]}, take)
                 for i, r in enumerate(nested["residuals"])]
    formats = nested.get("formats", [r.format_name for r in residuals])
    layer = NestedLinear(base, formats, residuals, damage, source)
    for k, r in nested.get("spare", {}).items():
        layer.spare[int(k)] = _quant_linear(f"{name}.spare.{k}", {**r, "shape": entry["shape"]}, take)
    return layer


def spare_state(root: nn.Module, entries: dict[str, dict]) -> dict[str, torch.Tensor]:
    """The tensors of the residuals the adaptive layers among ``entries`` hold off the model (a
    resumed run needs them; they are no part of the state dict), under the names
    :func:`install_layer` takes them by: ``<layer>.spare.<k>.<tensor>``, an expert's
    ``<projection>.<expert>.spare.<k>.<tensor>``."""
    out = {}
    for name, entry in entries.items():
        module = root.get_submodule(name)
        parts = {f"{name}.{e}": m for e, m in enumerate(module)} if entry.get("kind") == EXPERTS else {name: module}
        for prefix, layer in parts.items():
            for k, r in getattr(layer, "spare", {}).items():
                out.update({f"{prefix}.spare.{k}.{t}": v.detach().cpu().contiguous() for t, v in r.state_dict().items()})
    return out


def build_embedding(name: str, entry: dict, embedding: nn.Module, take: Take) -> QuantEmbedding:
    """The quantized table ``entry`` describes, to take the place of ``embedding`` (module ``name``,
    whose dtype, padding index and embedding scale it keeps); ValueError where they disagree."""
    check_entry(entry)
    shape = tuple(entry["shape"])
    if not isinstance(embedding, nn.Embedding) or tuple(embedding.weight.shape) != shape:
        raise ValueError(f"the model has no {shape[0]}x{shape[1]} embedding table there")
    layer = _quant_linear(name, entry, take)
    return QuantEmbedding(shape[0], shape[1], layer.format_name, layer.stored(), embedding.weight.dtype,
                          embedding.padding_idx, getattr(embedding, "embed_scale", None), layer.algorithm)


def _quant_linear(prefix: str, entry: dict, take: Take) -> QuantLinear:
    shape = tuple(entry["shape"])
    stored = {k: take(f"{prefix}.{k}") for k in entry["tensors"]}
    expected = get_format(entry["format"]).nbytes(shape)
    held = sum(t.numel() * t.element_size() for t in stored.values())
    if held != expected:
        raise ValueError(f"{entry['format']} needs {expected} bytes, the checkpoint holds {held} for {prefix}")
    bias = take(f"{prefix}.bias") if entry.get("bias") else None
    input_scale = take(f"{prefix}.input_scale") if entry.get("input_scale") else None
    input_perm = take(f"{prefix}.input_perm") if entry.get("input_perm") else None
    return QuantLinear(shape[1], shape[0], entry["format"], stored, bias, entry.get("algorithm") or "rtn",
                       entry.get("activation"), input_scale, entry.get("compute_dtype"), input_perm)
