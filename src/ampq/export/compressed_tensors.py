"""An ampq checkpoint as a compressed-tensors checkpoint: what vLLM (and transformers) load as
``quantization_config.quant_method: "compressed-tensors"``.

The tensors are made by compressed-tensors' own compressors (``PackedQuantizationCompressor``,
pack-quantized, for integer weights; ``FloatQuantizationCompressor``, float-quantized, for FP8)
from each layer's decoded weight and the scales (and zero points) that reproduce ampq's codes, and
the config by its ``QuantizationConfig`` / ``QuantizationScheme`` / ``QuantizationArgs`` and
``ModelCompressor.update_config``: the output is what the library itself writes. Every layer
called exact is checked: the library's own decompression of what is written must give, bit for
bit, the weight ampq decodes.

Exact (the same codes and scales):

- ``intK-gN-sym``, ``-ch-sym``, ``-t-sym`` (K = 4 or 8): ampq's w = scale * (q - 2^(K-1)) is
  compressed-tensors' symmetric w = scale * q_signed. A whole-tensor scale is repeated per channel
  (vLLM's weight-only integer kernels take groups or channels).
- ``intK-gN``, ``-ch`` (asymmetric, K = 4 or 8) only where every group's -min/scale is an integer
  in [0, 2^K - 1]: compressed-tensors' zero points are integers (packed into int32 like the codes;
  vLLM's kernels take uint4/uint8 zero points; the pack-quantized compressor refuses anything
  but int8), while ampq's minimum is any fp16 number. For fitted weights that is almost never
  so, and such layers need ``nearest``.
- ``fp8-e4m3-ch``, ``fp8-e4m3`` (per-tensor), also with ``fp8-e4m3-token`` activations (W8A8 with a
  dynamic per-token FP8 input scale).
- A group of N that does not divide the layer's inputs (ampq's partial last group) is written as
  groups of gcd(N, inputs) >= 32 with the scales repeated, which holds the same values.

Not expressible: int2/3/5/6/7, NF4/FP4, minifloats other than FP8 E4M3 per channel or tensor, FP8
groups, AWQ input scales kept outside the weights, LLM.int8 outlier or E5M2 activations, adaptive
layers above their base level. With ``nearest=True`` they are re-quantized from the weight ampq
decodes to the nearest expressible scheme (:func:`_nearest_scheme`), and the summary reports how far
the weights moved (max and mean absolute change), measured on what the library decompresses.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.export.common import base_of, change_summary, inexact_by_source, owner_of, source_of
from ampq.io.atomic import atomic_folder
from ampq.io.checkpoint import write_shards

# Layers vLLM fuses into one (qkv_proj, gate_up_proj): they must share one scheme.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MIN_GROUP = 32  # smallest group written when ampq's group does not divide the inputs
VLLM_GROUPS = (32, 64, 128)  # the group sizes vLLM's Marlin kernels take (besides per channel)
MAX_SHARD_BYTES = 2_000_000_000
_OWN_FILES = {"ampq.json", "config.json", "model.safetensors.index.json"}


def _require() -> None:
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        raise AmpqError("exporting to compressed-tensors needs the compressed-tensors package: "
                        "pip install 'ampq[export]' (or pip install 'compressed-tensors>=0.15')") from None


@dataclass(frozen=True)
class Scheme:
    """One compressed-tensors scheme: what one config group says about its layers."""

    type: str  # "int" or "float"
    bits: int
    strategy: str  # "group", "channel" or "tensor"
    group_size: int | None = None
    symmetric: bool = True
    fp8_tokens: bool = False  # dynamic per-token FP8 input activations (W8A8)

    @property
    def compression(self) -> str:
        return "pack-quantized" if self.type == "int" else "float-quantized"

    def describe(self) -> str:
        if self.type == "float":
            text = f"fp8-e4m3 per {self.strategy}"
        else:
            gran = f"group {self.group_size}" if self.strategy == "group" else f"per {self.strategy}"
            text = f"int{self.bits} {gran} {'symmetric' if self.symmetric else 'with zero points'}"
        return text + (" + fp8 per-token activations" if self.fp8_tokens else "")

    def build(self, targets: list[str]):
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

        weights = QuantizationArgs(num_bits=self.bits, type=self.type, symmetric=self.symmetric,
                                   strategy=self.strategy, group_size=self.group_size, dynamic=False)
        inputs = None
        if self.fp8_tokens:
            inputs = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="token", dynamic=True)
        return QuantizationScheme(targets=list(targets), weights=weights, input_activations=inputs,
                                  format=self.compression)


@dataclass
class _Layer:
    name: str
    module: nn.Module
    source: str  # what ampq stores, e.g. "int4-g128" or "int4-g128 + input scale"
    scheme: Scheme | None  # None: written unquantized (a 16-bit layer)
    exact: bool = True
    why: str = ""  # why it has no exact counterpart
    tensors: dict = field(default_factory=dict)


# ---- what each layer becomes ------------------------------------------------------------------


def _groups(group_size: int | None, in_features: int) -> tuple[str, int | None] | None:
    """compressed-tensors' (strategy, group size) that holds ampq's grouping exactly, or None."""
    if not group_size:  # None: one group per output channel; 0: one for the tensor, repeated per channel
        return "channel", None
    if in_features % group_size == 0:
        return "group", group_size
    g = math.gcd(group_size, in_features)
    return ("group", g) if g >= MIN_GROUP else None


def _is_e4m3(fmt) -> bool:
    s = fmt.spec
    return (s.exp_bits, s.man_bits, s.bias, s.special) == (4, 3, 7, "fn")


def _exact_scheme(layer: nn.Module) -> tuple[Scheme | None, str]:
    """(the scheme that holds ``layer`` exactly, "") or (None, why none does)."""
    from ampq.formats.integer import IntegerFormat
    from ampq.formats.minifloat import MinifloatFormat
    from ampq.formats.normal_float import NormalFloatFormat

    if getattr(layer, "residuals", None):
        return None, "adaptive layers above their base level add two formats"
    base = base_of(layer)
    fmt = base.format
    act = (base.activation or "").strip().lower() or None
    if base.input_scale is not None:
        return None, "AWQ input scales kept outside the weights (compressed-tensors has no per-input scale)"
    if base.input_perm is not None:
        return None, "GPTQ act-order groups (ampq does not write compressed-tensors' g_idx)"
    if isinstance(fmt, IntegerFormat):
        if act is not None:
            return None, f"{act} activations (compressed-tensors has no outlier decomposition)"
        if fmt.bits not in (4, 8):
            return None, f"{fmt.bits}-bit codes (vLLM's pack-quantized kernels take 4 and 8 bits)"
        groups = _groups(fmt.group_size, base.in_features)
        if groups is None:
            return None, (f"groups of {fmt.group_size} do not divide {base.in_features} inputs "
                          f"and leave no common group of {MIN_GROUP} or more")
        scheme = Scheme("int", fmt.bits, groups[0], groups[1], fmt.symmetric)
        if not fmt.symmetric and fmt.bits != 4:
            return None, "8-bit codes with zero points (vLLM's kernels take zero points with 4-bit codes only)"
        if not fmt.symmetric and not bool(_int_params(base, scheme)[2].all()):
            return None, ("w = min + scale * q with -min/scale not an integer in the code range, and "
                          "compressed-tensors' zero points are integers")
        return scheme, ""
    if isinstance(fmt, MinifloatFormat):
        if not (fmt.bits == 8 and _is_e4m3(fmt)):
            return None, f"{fmt.name}: compressed-tensors' minifloat weights are FP8 E4M3"
        if fmt.group_size not in (None, 0):
            return None, "FP8 groups (vLLM's FP8 weights have one scale per channel or per tensor)"
        if act not in (None, "fp8-e4m3-token"):
            return None, f"{act} activations (compressed-tensors' FP8 activations are E4M3)"
        return Scheme("float", 8, "channel" if fmt.group_size is None else "tensor",
                      fp8_tokens=act == "fp8-e4m3-token"), ""
    if isinstance(fmt, NormalFloatFormat):
        return None, "a 16-value codebook with a float32 absmax per block, not an integer grid"
    return None, f"{fmt.name} has no compressed-tensors counterpart"


def _nearest_groups(group_size: int | None, in_features: int) -> tuple[str, int | None]:
    exact = _groups(group_size, in_features)
    if exact is not None:
        return exact
    for g in (128, 64, 32):
        if g <= group_size and in_features % g == 0:
            return "group", g
    return "channel", None


def _nearest_scheme(layer: nn.Module) -> Scheme:
    """The expressible scheme a layer with no exact counterpart is re-quantized to.

    Integers widen to the next width vLLM runs (int2/int3 -> int4, int5-7 -> int8) with the same
    groups (or the largest of 128/64/32 that divides the inputs, else per channel): symmetric stays
    symmetric (the same scales then hold the same values: nothing moves); asymmetric codes of up
    to 4 bits become int4 with integer zero points, fitted min-max to the decoded weights (for
    int4 that is ampq's step with the minimum rounded to a whole step, wherever the codes span
    the range), wider ones symmetric int8 (vLLM takes zero points with 4 bits only). NF4/FP4 and
    minifloats of 4 to 7 bits become symmetric int4/int8 with the same blocks; 8-bit minifloats
    become FP8 E4M3 per channel (per tensor stays per tensor), their activations FP8 E4M3 per
    token. Adaptive layers above their base level become int8 per channel. AWQ input scales are
    folded into the weights first; LLM.int8's outlier activations are dropped (the weights stay).
    """
    from ampq.formats.integer import IntegerFormat
    from ampq.formats.minifloat import MinifloatFormat

    base = base_of(layer)
    fmt = base.format
    in_f = base.in_features
    act = (base.activation or "").strip().lower()
    if getattr(layer, "residuals", None):
        return Scheme("int", 8, "channel")
    if isinstance(fmt, MinifloatFormat) and fmt.bits == 8:
        return Scheme("float", 8, "tensor" if fmt.group_size == 0 else "channel",
                      fp8_tokens=act.startswith("fp8-") and act.endswith("-token"))
    bits = 4 if fmt.bits <= 4 else 8
    strategy, g = _nearest_groups(getattr(fmt, "group_size", None), in_f)
    symmetric = not (isinstance(fmt, IntegerFormat) and not fmt.symmetric and bits == 4)
    return Scheme("int", bits, strategy, g, symmetric)


# ---- the tensors --------------------------------------------------------------------------------


def _per_group(fmt, values: dict[str, torch.Tensor], shape: tuple[int, int], scheme: Scheme) -> dict:
    """ampq's per-group values in compressed-tensors' layout: (out, in / group) or (out, 1), or
    (1,) per tensor. Valid where each compressed-tensors group lies inside one of ampq's groups."""
    result = {}
    for key in ("scale", "min"):
        if key not in values:
            continue
        if scheme.strategy == "tensor":
            result[key] = values[key].reshape(1).float()
            continue
        full = fmt.expand({key: values[key]}, shape)[key]
        picked = full[:, :: scheme.group_size] if scheme.strategy == "group" else full[:, :1]
        result[key] = picked.float().contiguous()
    return result


def _int_params(layer, scheme: Scheme):
    """Scale, signed zero point (or None) and a per-group "exact" mask that give ampq's integer codes
    in ``scheme``: the weight decoded by compressed-tensors is ampq's, bit for bit, where the mask holds."""
    fmt = layer.format
    _, params = fmt.unpack(layer.stored(), layer.shape)
    v = _per_group(fmt, params.values, layer.shape, scheme)
    scale = v["scale"]
    if fmt.symmetric:  # an all-zero group has scale 0 and codes at the zero point: any scale holds it
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None, torch.ones_like(scale, dtype=torch.bool)
    qmax, half = (1 << fmt.bits) - 1, 1 << (fmt.bits - 1)
    s, m = scale.double(), v["min"].double()
    k = torch.round(-m / torch.where(s > 0, s, torch.ones_like(s)))
    ok = (s > 0) & (m + k * s == 0) & (k >= 0) & (k <= qmax)
    # A constant group (scale 0) holds its minimum m: scale |m| with code 1 over zero point 0 (m > 0)
    # or code 0 under zero point 1 (m < 0); m = 0 needs nothing.
    const = s == 0
    scale = torch.where(const, torch.where(m == 0, torch.ones_like(m), m.abs()), s).float()
    zero = torch.where(const, (m < 0).double(), k).clamp(0, qmax)
    return scale, (zero - half).to(torch.int8), ok | const


def _grouped(w: torch.Tensor, scheme: Scheme) -> torch.Tensor:
    if scheme.strategy == "tensor":
        return w.reshape(1, 1, -1)
    width = scheme.group_size if scheme.strategy == "group" else w.shape[1]
    return w.reshape(w.shape[0], -1, width)


def _fit_dtype(model_dtype: torch.dtype, ampq_dtype: torch.dtype) -> torch.dtype:
    # Fitted scales are rounded to the model's 16-bit dtype (what engines hold them in), else to the
    # precision ampq's own formats keep.
    return model_dtype if model_dtype in (torch.float16, torch.bfloat16) else ampq_dtype


def _same_grid(layer, scheme: Scheme) -> bool:
    """Whether ``layer`` is a plain symmetric integer layer whose groups tile ``scheme``'s: its
    scales then carry over group by group and hold the same values (int3-sym as int4-sym)."""
    from ampq.formats.integer import IntegerFormat

    fmt = getattr(layer, "format", None)
    if (layer is None or not isinstance(fmt, IntegerFormat) or layer.input_scale is not None
            or layer.input_perm is not None):
        return False
    if not (fmt.symmetric and scheme.symmetric and scheme.type == "int" and fmt.bits <= scheme.bits):
        return False
    if scheme.strategy == "channel":
        return not fmt.group_size
    if scheme.strategy == "group" and fmt.group_size:
        return fmt.group_size % scheme.group_size == 0 and (layer.in_features % fmt.group_size) % scheme.group_size == 0
    return False


def _fit(w: torch.Tensor, scheme: Scheme, model_dtype: torch.dtype, layer=None):
    """Scale and signed zero point (or None) re-quantizing ``w`` (float32) to ``scheme``. ``layer``:
    the ampq layer ``w`` was decoded from, when its scales may be carried over (no input scale)."""
    g = _grouped(w, scheme)
    if scheme.type == "float":
        dtype = torch.float32 if scheme.strategy == "tensor" else _fit_dtype(model_dtype, torch.bfloat16)
        scale = (g.abs().amax(dim=2) / 448.0).to(dtype).float()
        scale = scale.reshape(1) if scheme.strategy == "tensor" else scale
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    half, qmax = 1 << (scheme.bits - 1), (1 << scheme.bits) - 1
    same_grid = layer is not None and _same_grid(layer, scheme)
    dtype = _fit_dtype(model_dtype, torch.float16)
    if scheme.symmetric:
        if same_grid:  # a narrower symmetric integer: the same scales hold the same values
            return _int_params(layer, scheme)[:2]
        scale = (g.abs().amax(dim=2) / (half - 1)).to(dtype).float()
        return torch.where(scale > 0, scale, torch.ones_like(scale)), None
    # with zero points: min-max over each group, the range stretched to hold 0 (so the zero point fits)
    lo, hi = g.amin(dim=2).clamp(max=0), g.amax(dim=2).clamp(min=0)
    scale = ((hi - lo) / qmax).to(dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zero = torch.round(-lo / scale).clamp(0, qmax)
    return scale, (zero - half).to(torch.int8)


def _compressor(scheme: Scheme):
    from compressed_tensors.compressors import FloatQuantizationCompressor, PackedQuantizationCompressor

    return PackedQuantizationCompressor if scheme.type == "int" else FloatQuantizationCompressor


def _compress(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, scheme: Scheme):
    """compressed-tensors' tensors for one layer (local names) and the weight it decompresses them to."""
    ct_scheme = scheme.build(["Linear"])
    compressor = _compressor(scheme)
    state = {"weight": w.float().contiguous(), "weight_scale": scale.float().contiguous()}
    if zero is not None:
        state["weight_zero_point"] = zero.contiguous()
    packed = dict(compressor.compress(state, ct_scheme))
    decoded = compressor.decompress(dict(packed), ct_scheme)["weight"].float()
    return packed, decoded


def _scale_dtype(scale: torch.Tensor, candidates: list[torch.dtype]) -> torch.dtype:
    """The first of ``candidates`` that holds every scale exactly (float32 always does)."""
    for dtype in candidates:
        if torch.equal(scale.to(dtype).float(), scale):
            return dtype
    return torch.float32


def _convert(item: _Layer, model_dtype: torch.dtype) -> dict:
    """Fill ``item.tensors`` (names local to the layer); return the weight change, for ``nearest``."""
    layer, scheme = item.module, item.scheme
    base = base_of(layer)
    change: dict = {}
    weight = layer.dequantize(torch.float32)
    if scheme is None:  # a 16-bit layer, written as it is
        item.tensors = {"weight": base.stored()["weight"].reshape(layer.shape)}
    else:
        if base.input_scale is not None:
            weight = weight / base.input_scale.float()  # y = W (x / s) = (W / s) x
        if item.exact:
            if scheme.type == "int":
                scale, zero, _ = _int_params(base, scheme)
            else:
                fmt = base.format
                _, params = fmt.unpack(base.stored(), base.shape)
                scale = _per_group(fmt, params.values, base.shape, scheme)["scale"]
                scale, zero = torch.where(scale > 0, scale, torch.ones_like(scale)), None
        else:
            plain = base if not getattr(layer, "residuals", None) else None
            scale, zero = _fit(weight, scheme, model_dtype, plain)
        packed, decoded = _compress(weight, scale, zero, scheme)
        if item.exact and not torch.equal(decoded, weight):
            raise AmpqError(f"internal error: layer {item.name} ({item.source}) does not come back exactly from "
                            f"compressed-tensors (max difference {float((decoded - weight).abs().max()):.3g}); "
                            "please report it, with the checkpoint's ampq.json")
        ampq_dtype = torch.float16 if scheme.type == "int" else (torch.bfloat16 if scheme.strategy == "channel"
                                                                 else torch.float32)
        # the model's dtype where it holds every scale exactly (compressed-tensors decodes in the scale's
        # dtype, so float32 scales keep a float32 model's weights exact), else the precision ampq keeps
        packed["weight_scale"] = scale.to(_scale_dtype(scale, [model_dtype, ampq_dtype]))
        item.tensors = packed
        if not item.exact:
            diff = (decoded - weight).abs()
            change = {"from": item.source, "to": scheme.describe(), "max_abs_change": float(diff.max()),
                      "mean_abs_change": float(diff.mean()), "weights": diff.numel()}
    if layer.bias is not None:
        item.tensors["bias"] = layer.bias.detach()
    return change


# ---- checks ----------------------------------------------------------------------------------------


def _check_fused(items: dict[str, _Layer], linears: list[str]) -> None:
    """vLLM fuses q/k/v (and gate/up) of a block into one layer with one scheme; refuse what it cannot."""
    present = set(linears)
    parents: dict[str, set[str]] = {}
    for name in linears:
        parent, _, child = name.rpartition(".")
        parents.setdefault(parent, set()).add(child)
    for parent, children in parents.items():
        for fused in FUSED:
            members = [c for c in fused if c in children]
            if len(members) < 2:
                continue
            full = [f"{parent}.{c}" if parent else c for c in members]
            status = {c: (items[n].scheme if n in items else None) for c, n in zip(members, full) if n in present}
            if len(set(status.values())) > 1:
                def show(c):
                    n = f"{parent}.{c}" if parent else c
                    s = status[c]
                    return f"{c} is {items[n].source} ({s.describe()})" if s is not None else (
                        f"{c} is {items[n].source} (unquantized)" if n in items else f"{c} is not quantized")
                raise AmpqError(f"{parent or 'the model'}: vLLM fuses {'/'.join(members)} into one layer with one "
                                f"scheme, but {', '.join(show(c) for c in members)}; quantize them with one format "
                                "(ampq ties them unless --untied) and export again")


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AmpqError(f"cannot export to {out}: it exists and is not a directory; choose another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AmpqError(f"cannot export to {out}: the directory exists and is not empty; "
                        "pass --overwrite (overwrite=True) or choose another path")


# ---- config groups -----------------------------------------------------------------------------------


def _pattern(name: str) -> str:
    import re

    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _targets(names: list[str], linears: list[str]) -> list[str]:
    """The group's layers as targets: one ``re:`` pattern (block index as \\d+) where the pattern
    covers no linear outside the group, else the exact module names."""
    mine = set(names)
    by_pattern: dict[str, list[str]] = {}
    for n in names:
        by_pattern.setdefault(_pattern(n), []).append(n)
    everywhere: dict[str, int] = {}
    for n in linears:
        p = _pattern(n)
        if p in by_pattern:
            everywhere[p] = everywhere.get(p, 0) + 1
    targets = []
    for p, members in by_pattern.items():
        if len(members) > 1 and everywhere[p] == len(members) and all(m in mine for m in members):
            targets.append(f"re:{p}$")  # matched from the start of the name
        else:
            targets.extend(members)
    return targets


def _check_targets(config_groups: dict, groups: dict, items: dict[str, _Layer], linears: list[str],
                   ignore: list[str]) -> None:
    """Every quantized linear must match the targets of its own group and no other, as
    compressed-tensors' own matcher reads them ("Linear" matches every linear; ``ignore`` wins)."""
    from compressed_tensors.utils.match import match_name

    wanted = dict(zip(groups, config_groups))  # scheme -> its group's name
    for name in linears:
        if name in ignore:
            continue
        hits = [g for g, ct in config_groups.items()
                if any(t == "Linear" or match_name(name, t) for t in ct.targets)]
        want = [wanted[items[name].scheme]]
        if hits != want:
            raise AmpqError(f"internal error: {name} would match config groups {hits}, not {want}; please report it")


# ---- writing ----------------------------------------------------------------------------------------


# ---- the export -------------------------------------------------------------------------------------


def export_compressed_tensors(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` as a compressed-tensors checkpoint in ``out``.

    Layers whose format has no exact compressed-tensors counterpart are refused, all in one error,
    unless ``nearest`` (then re-quantized; see the module's docstring). q/k/v and gate/up of a block
    must share one scheme (vLLM fuses them). Layers not quantized go into ``ignore``; embeddings,
    norms and the head are written as they are, with ``config.json`` (plus its
    ``quantization_config``), the generation config and the tokenizer files from ``directory``.
    Atomic: written into a hidden folder next to ``out``, then renamed. Returns a summary.
    """
    _require()
    import ampq
    from ampq.formats.plain import PlainFloatFormat
    from ampq.models import tied_embeddings
    from ampq.nn import quantized_linears

    directory, out = Path(directory), Path(out)
    if out.resolve() == directory.resolve():
        raise AmpqError(f"cannot export {directory} onto itself; choose another output folder")
    _check_target(out, overwrite)
    model = ampq.load(directory)
    model_dtype = model.get_input_embeddings().weight.dtype
    layers = quantized_linears(model)
    linears = [n for n, m in model.named_modules() if n in layers or isinstance(m, nn.Linear)]

    items: dict[str, _Layer] = {}
    for name, layer in layers.items():
        if isinstance(base_of(layer).format, PlainFloatFormat) and not getattr(layer, "residuals", None):
            items[name] = _Layer(name, layer, source_of(layer), None)
            continue
        scheme, why = _exact_scheme(layer)
        items[name] = _Layer(name, layer, source_of(layer), scheme, scheme is not None, why)

    inexact = [it for it in items.values() if not it.exact]
    if inexact and not nearest:
        by_source, parts = inexact_by_source(inexact)
        targets = "; ".join(f"{src} -> {' / '.join(dict.fromkeys(_nearest_scheme(it.module).describe() for it in its))}"
                            for src, its in by_source.items())
        raise AmpqError(f"cannot export {directory} to compressed-tensors exactly: {len(inexact)} layers have formats "
                        f"it cannot hold: {'; '.join(parts)}. Pass --nearest (nearest=True) to re-quantize them from "
                        f"the weights ampq decodes to the nearest expressible scheme ({targets}); the export then "
                        "reports how far the weights moved")
    for it in inexact:
        it.scheme = _nearest_scheme(it.module)
    _check_fused(items, linears)

    # config groups, in the model's order
    groups: dict[Scheme, list[str]] = {}
    for name in linears:
        if name in items and items[name].scheme is not None:
            groups.setdefault(items[name].scheme, []).append(name)
    ignore = [n for n in linears if n not in items or items[n].scheme is None]
    from compressed_tensors.quantization import QuantizationConfig

    # One scheme: every linear not ignored, as llm-compressor writes it. Several: each group's layers by name.
    config_groups = {f"group_{i}": scheme.build(["Linear"] if len(groups) == 1 else _targets(names, linears))
                     for i, (scheme, names) in enumerate(groups.items())}
    _check_targets(config_groups, groups, items, linears, ignore)
    formats = {s.compression for s in groups}
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")

    # tensors, in the state dict's order, each quantized layer where its first tensor was
    converted, warnings = {}, []
    for it in items.values():
        change = _convert(it, model_dtype)
        if change:
            converted[it.name] = change
    state = model.state_dict()
    if tied_embeddings(model):
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{head}.weight", None)
    tensors: dict[str, torch.Tensor] = {}
    done = set()
    for key, value in state.items():
        owner = owner_of(key, items)
        if owner is None:
            tensors[key] = value
        elif owner not in done:
            done.add(owner)
            tensors.update({f"{owner}.{k}": v for k, v in items[owner].tensors.items()})

    odd = sorted({s.group_size for s in groups if s.type == "int" and s.strategy == "group"} - set(VLLM_GROUPS))
    if odd:
        warnings.append(f"group size {', '.join(map(str, odd))}: vLLM's Marlin kernels take groups of "
                        f"{', '.join(map(str, VLLM_GROUPS))} or channels; other kernels may run it")
    head = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    if head in items and items[head].scheme is not None:
        warnings.append(f"the output head ({head}) is quantized: recent vLLM versions run a quantized head from "
                        "compressed-tensors, older ones expect it unquantized")
    wide = sorted({n for n, it in items.items() if "weight_scale" in it.tensors
                   and it.tensors["weight_scale"].dtype != model_dtype})
    if wide and model_dtype != torch.float32:
        warnings.append(f"{len(wide)} layers keep scales that {str(model_dtype).removeprefix('torch.')} cannot hold "
                        f"exactly (stored as they are); engines that hold scales in the model dtype round them "
                        f"(vLLM: --dtype float16 keeps fp16 scales exact)")
    if model_dtype == torch.float32 and any(s.type == "int" for s in groups):
        warnings.append("the model is float32: vLLM runs it in 16 bits; --dtype float16 keeps ampq's fp16 scales exact")

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_folder(out) as tmp:
        write_shards(tmp, tensors, MAX_SHARD_BYTES)
        config = json.loads((directory / "config.json").read_text())
        for key in [k for k in config if k.startswith("ampq") or k == "quantization_config"]:
            del config[key]
        # the dtype of the unquantized weights written (a config re-saved by ampq may say otherwise)
        for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
            config[key] = str(model_dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        from compressed_tensors.compressors import ModelCompressor

        ModelCompressor(quantization_config=qconfig).update_config(str(tmp))
        for p in sorted(directory.iterdir()):
            if p.is_file() and p.name not in _OWN_FILES and not p.name.endswith(".safetensors"):
                shutil.copyfile(p, tmp / p.name)
        nbytes = sum(p.stat().st_size for p in tmp.iterdir() if p.is_file())
        _check_target(out, overwrite)  # someone may have made it meanwhile

    summary = {
        "out": str(out), "source": str(directory),
        "layers": sum(1 for it in items.values() if it.scheme is not None),
        "exact": sum(1 for it in items.values() if it.scheme is not None and it.exact),
        "config_groups": {g: {"scheme": s.describe(), "format": s.compression, "layers": len(groups[s]),
                              "targets": config_groups[g].targets} for g, s in zip(config_groups, groups)},
        "format": qconfig.format, "ignore": ignore, "bytes": nbytes,
        "converted": converted,
        **change_summary(converted),
        "warnings": warnings,
    }
    change = summary.pop("change_text")
    summary["line"] = (f"{out}: {summary['layers']} quantized layers ({summary['exact']} exact{change}) in "
                       f"{len(config_groups)} config group{'s' if len(config_groups) != 1 else ''} "
                       f"({qconfig.format}), {len(ignore)} ignored, {nbytes:,} bytes")
    return summary
