"""The one way an ampq checkpoint is exported: load it, decide per layer whether the target holds
its format exactly, refuse (all layers in one error) or re-quantize the rest with ``nearest``,
convert, check each exact layer bit for bit, put the tensors in the model's order and write them
atomically. What differs between targets, how formats map onto them and how their files are
written, is a :class:`Target`; this module knows no target."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ampq.atomic import atomic_file, atomic_folder
from ampq.errors import AmpqError
from ampq.io.model import load
from ampq.models import lm_head_name, tied_embeddings
from ampq.quant_embedding import quantized_embeddings
from ampq.nn import quantized_linears
from ampq.quant_experts import quantized_projections
from ampq.pipeline.targets import check_export


def base_of(layer: nn.Module) -> nn.Module:
    """The QuantLinear that holds the layer's format (an adaptive layer's base)."""
    return getattr(layer, "base", layer)


def source_of(layer: nn.Module) -> str:
    """What ampq stores for ``layer``, for messages: "int4-g128", "int4-g128 + input scale", ..."""
    base = base_of(layer)
    text = layer.format_name
    if base.activation:
        text += f" + {base.activation} activations"
    if base.input_scale is not None:
        text += " + input scale"
    if base.input_perm is not None:
        text += " + act-order input permutation"
    return text


def decoded_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight ampq computes with, an AWQ input scale folded in: y = W (x / s) = (W / s) x."""
    weight = layer.dequantize(torch.float32)
    scale = base_of(layer).input_scale
    return weight if scale is None else weight / scale.float()


@dataclass(frozen=True)
class Decision:
    """What a target makes of one layer: ``kind`` (the target's own description of what it writes,
    None for "as stored, unquantized") when ``exact``, else ``why`` no kind holds it."""

    kind: object = None
    exact: bool = True
    why: str = ""
    widened: bool = False  # exact, but in a wider type than the format's own bits


@dataclass
class Layer:
    """One quantized linear on its way out."""

    name: str  # the module's name in the model
    module: nn.Module
    source: str  # what ampq stores, e.g. "int4-g32" or "int4-g128 + input scale"
    kind: object  # what the target writes (before conversion, with nearest: the candidates)
    exact: bool
    why: str = ""
    widened: bool = False
    tensors: dict = field(default_factory=dict)  # the target's tensor names -> what it writes
    change: dict = field(default_factory=dict)  # for a re-quantized layer: how far the weights moved


@dataclass
class Conversion:
    """One layer in the target: its tensors (target names), the kind written, and for a check,
    the weight that decodes from them next to the one ampq decodes (None: nothing to check)."""

    tensors: dict
    kind: object
    decoded: object = None  # torch tensor or numpy array
    expected: object = None


class Target(ABC):
    """One format ampq checkpoints export to. The driver calls, in order: :meth:`check_source`
    (before loading), :meth:`start` (the loaded model), :meth:`expert_layers`, :meth:`decide` (each layer),
    :meth:`nearest` (inexact layers, with ``nearest``), :meth:`check` (all layers decided),
    :meth:`convert` (each layer), :meth:`plain` (each other tensor), :meth:`write` (into a
    temporary file or folder) and :meth:`summary`. One instance per export."""

    name = ""  # in messages: "compressed-tensors", "GGUF"
    export_name = ""  # as `ampq export --to` names it
    folder = True  # writes a folder of files (else one file)
    holds = ""  # a sentence on what it holds exactly, for the refusal ("" or ending in ". ")
    nearest_how = ""  # how ``nearest`` re-quantizes, for the refusal
    allow_nearest = False  # whether this export may re-quantize (``nearest``), for :meth:`check`
    quantized_embeddings = False  # whether the target holds a quantized embedding table (else it is refused)

    def __init__(self, directory: Path):
        self.directory = directory
        self.warnings: list[str] = []

    def check_source(self) -> None:
        """Refuse a checkpoint this target cannot take, before the work of loading it."""

    def start(self, model: nn.Module) -> None:
        """Take what is needed from the loaded model."""
        self.model = model

    @abstractmethod
    def decide(self, layer: nn.Module) -> Decision:
        """Whether, and as what, the target holds ``layer`` exactly."""

    @abstractmethod
    def nearest(self, layer: nn.Module) -> object:
        """The kind a layer with no exact counterpart is re-quantized to."""

    def describe(self, kind: object) -> str:
        return str(kind)

    def expert_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        """The quantized experts, each expert's projection one layer by the name of its QuantLinear
        (``model.layers.0.mlp.experts.gate_up_proj.3``); a target that cannot write them refuses here."""
        experts = quantized_projections(model)
        if experts:
            raise AmpqError(f"{self.directory} holds quantized mixture-of-experts weights ({len(experts)} expert "
                            f"projections, e.g. {next(iter(experts))}), which the {self.export_name} export cannot "
                            "write yet; serve it with ampq (ampq.load or from_pretrained after import ampq)")
        return {}

    def check(self, layers: dict[str, Layer]) -> None:
        """Refuse combinations of layers the target cannot hold (each layer decided)."""

    @abstractmethod
    def convert(self, layer: Layer) -> Conversion:
        """``layer`` (decided; ``layer.kind`` the candidates when re-quantized) in the target."""

    def plain(self, key: str, value: torch.Tensor) -> dict:
        """A tensor of no quantized layer (embeddings, norms, an unquantized head), in the target."""
        return {key: value}

    @abstractmethod
    def write(self, tmp: Path, tensors: dict, layers: dict[str, Layer]) -> None:
        """Write ``tensors`` (the target's names, in the model's order) to ``tmp``, a file or an empty
        folder that takes the output's place once this returns."""

    @abstractmethod
    def summary(self, summary: dict, layers: dict[str, Layer], tensors: dict) -> dict:
        """The target's own keys for the summary (it holds the shared ones), with its one-line ``line``."""


def run(target_class: type[Target], directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` to ``out`` in ``target_class``'s format; return a
    summary (``line`` for people, ``warnings``, ``converted`` with each re-quantized layer's change)."""
    directory, out = Path(directory), Path(out)
    target = target_class(directory)
    _check_output(out, overwrite, target)
    if out.resolve() == directory.resolve():
        raise AmpqError(f"cannot export {directory} onto itself; choose another output path")
    if not (directory / "ampq.json").is_file():
        raise AmpqError(f"{directory} is not an ampq checkpoint (no ampq.json); quantize and save a model "
                        "with ampq first")
    target.check_source()
    try:
        plan = json.loads((directory / "ampq.json").read_text()).get("plan") or {}
    except ValueError:
        plan = {}  # load() below names what is wrong with the manifest
    check_export(plan.get("target"), target.export_name)
    model = load(directory)
    target.start(model)

    tables = quantized_embeddings(model)
    if tables and not target.quantized_embeddings:
        name, table = next(iter(tables.items()))
        raise AmpqError(f"cannot export {directory} to {target.name}: its embedding table {name} is stored in "
                        f"{table.format_name} (quantized with --embeddings), and {target.name} keeps embeddings in 16 "
                        "bits; quantize without --embeddings to serve the model there")
    layers = {}
    for name, module in {**quantized_linears(model), **target.expert_layers(model), **tables}.items():
        d = target.decide(module)
        layers[name] = Layer(name, module, source_of(module), d.kind, d.exact, d.why, d.widened)
    inexact = [it for it in layers.values() if not it.exact]
    if inexact and not nearest:
        raise _refusal(target, inexact)
    for it in inexact:
        it.kind = target.nearest(it.module)
    target.allow_nearest = nearest
    target.check(layers)
    for it in layers.values():
        _convert(target, it)

    tensors = _in_model_order(model, layers, target)
    out.parent.mkdir(parents=True, exist_ok=True)
    with (atomic_folder if target.folder else atomic_file)(out) as tmp:
        target.write(tmp, tensors, layers)
        _check_output(out, overwrite, target)  # someone may have made it meanwhile
    nbytes = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) if target.folder else out.stat().st_size

    converted = {n: it.change for n, it in layers.items() if it.change}
    weights = sum(c["weights"] for c in converted.values())
    top = max((c["max_abs_change"] for c in converted.values()), default=0.0)
    mean = sum(c["mean_abs_change"] * c["weights"] for c in converted.values()) / weights if weights else 0.0
    summary = {
        "out": str(out), "source": str(directory),
        "layers": sum(1 for it in layers.values() if it.kind is not None),
        "exact": sum(1 for it in layers.values() if it.kind is not None and it.exact),
        "bytes": nbytes, "converted": converted, "max_abs_change": top, "mean_abs_change": mean,
        "warnings": target.warnings,
    }
    summary.update(target.summary(summary, layers, tensors))
    return summary


def change_text(summary: dict) -> str:
    """The summary line's words on the re-quantized layers ("" when there are none)."""
    if not summary["converted"]:
        return ""
    return (f", {len(summary['converted'])} re-quantized (max |dW| {summary['max_abs_change']:.3g}, "
            f"mean {summary['mean_abs_change']:.3g})")


def _check_output(out: Path, overwrite: bool, target: Target) -> None:
    if target.folder:
        if out.exists() and not out.is_dir():
            raise AmpqError(f"cannot export to {out}: it exists and is not a directory; choose another path")
        if out.is_dir() and any(out.iterdir()) and not overwrite:
            raise AmpqError(f"cannot export to {out}: the directory exists and is not empty; "
                            "pass --overwrite (overwrite=True) or choose another path")
    else:
        if out.is_dir():
            raise AmpqError(f"cannot export to {out}: it is a directory; give the path of the {target.name} file "
                            "to write")
        if out.exists() and not overwrite:
            raise AmpqError(f"cannot export to {out}: the file exists; pass --overwrite (overwrite=True) "
                            "or choose another path")


def _refusal(target: Target, inexact: list[Layer]) -> AmpqError:
    """One error naming every format the target cannot hold, with an example layer, and where
    ``nearest`` would take each."""
    by_source: dict[str, list[Layer]] = {}
    for it in inexact:
        by_source.setdefault(it.source, []).append(it)
    parts = [f"{src} ({len(its)} layer{'s' if len(its) > 1 else ''}, e.g. {its[0].name}: {its[0].why})"
             for src, its in by_source.items()]
    goes = [f"{src} -> {' / '.join(dict.fromkeys(target.describe(target.nearest(it.module)) for it in its))}"
            for src, its in by_source.items()]
    return AmpqError(f"cannot export {target.directory} to {target.name} exactly: {len(inexact)} layers have "
                     f"formats it cannot hold: {'; '.join(parts)}. {target.holds}Pass --nearest (nearest=True) to "
                     f"re-quantize them from the weights ampq decodes {target.nearest_how} ({'; '.join(goes)}); the "
                     "export then reports how far the weights moved")


def _convert(target: Target, layer: Layer) -> None:
    c = target.convert(layer)
    layer.tensors, layer.kind = c.tensors, c.kind
    if c.decoded is None:
        return
    decoded, expected = torch.as_tensor(c.decoded), torch.as_tensor(c.expected)
    dtype = torch.promote_types(decoded.dtype, expected.dtype)  # e.g. F16 data read back as float16
    decoded, expected = decoded.to(dtype), expected.to(dtype)
    if layer.exact:
        if not torch.equal(decoded, expected):
            raise AmpqError(f"internal error: layer {layer.name} ({layer.source}) does not come back exactly from "
                            f"{target.name} {target.describe(layer.kind)} (max difference "
                            f"{float((decoded - expected).abs().max()):.3g}); please report it, with the "
                            "checkpoint's ampq.json")
        return
    diff = (decoded - expected).abs()
    layer.change = {"from": layer.source, "to": target.describe(layer.kind), "max_abs_change": float(diff.max()),
                    "mean_abs_change": float(diff.mean()), "weights": diff.numel()}


def _in_model_order(model: nn.Module, layers: dict[str, Layer], target: Target) -> dict:
    """Every tensor the target writes, in the state dict's order, each quantized layer's where its
    first tensor was; a tied head is left out (written once, as the embeddings)."""
    state = model.state_dict()
    if tied_embeddings(model):
        head = lm_head_name(model)
        state.pop(f"{head}.weight", None)
    tensors: dict = {}
    done: set[str] = set()
    for key, value in state.items():
        owner = _owner(key, layers)
        if owner is None:
            tensors.update(target.plain(key, value))
        elif owner not in done:
            done.add(owner)
            tensors.update(layers[owner].tensors)
    return tensors


def _owner(key: str, layers) -> str | None:
    """The longest prefix of the tensor name ``key`` that is one of ``layers`` (its layer), or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None
