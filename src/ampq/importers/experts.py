"""Experts that a checkpoint stores one by one under the hub's names (``block_sparse_moe.experts.3.w1``,
``mlp.experts.3.gate_proj``; :mod:`ampq.expert_names`), read into the model transformers 5 builds,
whose experts are 3D weights: quantized experts become a :class:`~ampq.quant_experts.QuantExperts`
(each expert's gate and up, converted by the layout's own reader, joined row by row into the one
gate/up QuantLinear ampq keeps), 16-bit ones are stacked into the 3D weight they came from."""

from __future__ import annotations

import torch
from torch import nn

from ampq.expert_names import HubExperts, expert_modules
from ampq.experts import expert_shape, experts_modules, projections, transposed
from ampq.importers.common import quant_linear
from ampq.models import replace_module
from ampq.quant_experts import QuantExperts


def read_experts(model: nn.Module, tensors: dict, naming: HubExperts, convert) -> list[str]:
    """Take every expert's tensors out of ``tensors`` into ``model``; ``convert(prefix, take,
    linear)`` is the layout's reader of one linear (a QuantLinear, or None where it is not
    quantized). Returns the names of the experts modules that hold quantized experts."""
    done = []
    for name, module in experts_modules(model).items():
        if transposed(module) or set(projections(module)) != {"gate_up_proj", "down_proj"}:
            continue
        count = module._parameters["down_proj"].shape[0]
        names = [expert_modules(name, e, naming) for e in range(count)]
        if f"{names[0][2]}.weight" not in tensors and f"{names[0][2]}.weight_packed" not in tensors:
            continue  # not stored one by one: load_state_dict finds the 3D weights, or names what lacks
        read = {}
        for p in ("gate_up_proj", "down_proj"):
            out, inp = expert_shape(module, p)
            parts = [(n[0], n[1]) if p == "gate_up_proj" else (n[2],) for n in names]
            floats = [[_float(tensors, f"{h}.weight") for h in hubs] for hubs in parts]
            if all(w is not None for ws in floats for w in ws):
                read[p] = torch.stack([torch.cat(ws) for ws in floats])
                continue
            linears = []
            for e, hubs in enumerate(parts):
                layers = [_quantized(convert, h, tensors, out // len(hubs), inp) for h in hubs]
                linears.append(layers[0] if len(layers) == 1 else _joined(layers, f"{name}.{p}.{e}"))
            read[p] = linears
        if all(isinstance(v, torch.Tensor) for v in read.values()):  # 16-bit: the 3D weights load as they are
            tensors.update({f"{name}.{p}": w for p, w in read.items()})
            continue
        replaced = QuantExperts(module)
        for p, value in read.items():
            if isinstance(value, torch.Tensor):
                replaced.set_float(p, value)
            else:
                replaced.set_quantized(p, value)
        replace_module(model, name, replaced)
        done.append(name)
    return done


def _float(tensors: dict, key: str) -> torch.Tensor | None:
    t = tensors.get(key)
    if t is None or not t.is_floating_point() or t.dtype.itemsize < 2:
        return None
    return tensors.pop(key)


def _quantized(convert, prefix: str, tensors: dict, rows: int, inp: int):
    def take(key, peek=False):
        full = f"{prefix}.{key}"
        return tensors.get(full) if peek else tensors.pop(full, None)

    with torch.device("meta"):
        linear = nn.Linear(inp, rows, bias=False)
    layer = convert(prefix, take, linear)
    if layer is None:
        raise ValueError(f"{prefix} holds no quantized weight beside quantized experts")
    return layer


def _joined(layers: list, name: str):
    """One QuantLinear holding ``layers``' rows one after another (an expert's gate, then its up)."""
    first = layers[0]
    if any(m.format_name != first.format_name or m.activation != first.activation for m in layers):
        raise ValueError(f"{name}: gate and up are stored in different formats "
                         f"({', '.join(m.format_name for m in layers)})")
    if any(m.input_perm is not None for m in layers):
        raise ValueError(f"{name}: gate and up with act-order input permutations cannot be joined")
    fmt = first.format
    codes = torch.cat([fmt.unpack(m.stored(), m.shape)[0] for m in layers])
    params = {}
    for key in first.stored_names:
        if key == "codes":
            continue
        parts = [m.stored()[key] for m in layers]
        if all(t.shape[0] == m.out_features for t, m in zip(parts, layers)) and first.out_features > 1:
            params[key] = torch.cat(parts)
        elif all(torch.equal(t, parts[0]) for t in parts):
            params[key] = parts[0]
        else:
            raise ValueError(f"{name}: gate and up have different {key} for the whole tensor, which one "
                             "gate/up weight cannot hold")
    with torch.device("meta"):
        linear = nn.Linear(first.in_features, sum(m.out_features for m in layers), bias=False)
    return quant_linear(linear, first.format_name, codes, params, None, first.algorithm,
                        activation=first.activation)
