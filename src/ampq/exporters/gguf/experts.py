"""Mixture-of-experts experts in a GGUF file, as llama.cpp's converter writes them: each projection
of the experts of a block one 3D tensor (``blk.N.ffn_gate_exps`` / ``ffn_up_exps`` /
``ffn_down_exps``, ggml's shape {inputs, outputs, experts}), transformers 5's fused ``gate_up_proj``
cut into its gate rows and its up rows; routers (``ffn_gate_inp``, Qwen2-MoE's
``ffn_gate_inp_shexp``) in F32 where they are not quantized.

ampq quantizes each expert as a QuantLinear of its own; every expert is repacked into GGUF blocks
as a linear is (:func:`.blocks.exact_blocks`, checked bit for bit), and the experts of one
projection are stacked. A GGUF tensor has one type, so the experts of one projection in one block
must share it: where they do not, the export is refused, or with ``nearest`` every expert of that
projection is re-quantized by gguf-py into one type, the widest of the types its experts map to
(Q8_0 where that is a type gguf-py cannot quantize to); experts already of that type stay exact.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn

from ampq.errors import AmpqError
from ampq.experts import experts_modules, projections
from ampq.experts import transposed as is_transposed
from ampq.exporters.gguf.blocks import plain_array
from ampq.quant_experts import quantized_projections

# the types gguf-py can quantize to (the targets of ``nearest``)
QUANTIZABLE = (T.BF16, T.F16, T.Q8_0, T.Q5_1, T.Q5_0, T.Q4_1, T.Q4_0)
ROUTERS = (gguf.MODEL_TENSOR.FFN_GATE_INP, gguf.MODEL_TENSOR.FFN_GATE_INP_SHEXP)


def bits_per_weight(qtype: T) -> float:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return size * 8 / block


def common_type(types: set[T]) -> T:
    """One type for experts that map to ``types``: the widest of them gguf-py can quantize to, or
    Q8_0 where a wider one (a K-quant, an IQ type) is not such a type."""
    widest = max(bits_per_weight(t) for t in types)
    targets = [t for t in types if t in QUANTIZABLE]
    best = max(targets, key=bits_per_weight, default=None)
    return best if best is not None and bits_per_weight(best) >= widest else T.Q8_0


class Experts:
    """The experts of one model on their way into a GGUF file."""

    def __init__(self, model: nn.Module, directory, name):
        self.directory = directory
        self.name = name  # transformers tensor name -> llama.cpp's (the target's ``_name``)
        self.modules = experts_modules(model)
        self.layers: dict[str, nn.Module] = {}  # an expert's QuantLinear by its name in the model
        self.where: dict[str, tuple[str, str, int]] = {}  # that name -> (experts module, projection, expert)
        for name_, module in self.modules.items():
            quant = getattr(module, "is_quantized_experts", False)
            names = list(module.names) if quant else projections(module)
            transposed = module.transposed if quant else is_transposed(module)
            if transposed or names not in (["gate_up_proj", "down_proj"], ["up_proj", "down_proj"]):
                raise AmpqError(f"cannot export {directory} to GGUF: the experts at {name_} hold {names}"
                                f"{' transposed' if transposed else ''}, not the gate_up_proj / down_proj llama.cpp's "
                                "converter writes as ffn_gate_exps / ffn_up_exps / ffn_down_exps")
        for name_, (module, p) in quantized_projections(model).items():
            owner = name_.rpartition(".")[0]
            for e, layer in enumerate(module.quantized(p)):
                self.layers[f"{name_}.{e}"] = layer
                self.where[f"{name_}.{e}"] = (owner, p, e)

    def names(self, owner: str, projection: str) -> list[str]:
        """llama.cpp's names of what the 3D weight ``projection`` of the experts ``owner`` becomes."""
        leaves = ("gate_proj", "up_proj") if projection == "gate_up_proj" else (projection,)
        return [self.name(f"{owner}.{leaf}.weight") for leaf in leaves]

    def split(self, owner: str, projection: str, data, expert: int | None = None) -> dict:
        """``data`` (rows first: one expert's, or [experts, rows, ...]) cut into its gate and up rows
        where ``projection`` is the fused gate/up; keys are (name, expert) for one expert's rows."""
        names = self.names(owner, projection)
        axis = 0 if expert is not None else 1
        parts = np.split(data, len(names), axis=axis) if len(names) > 1 else [data]
        return {(n if expert is None else (n, expert)): np.ascontiguousarray(part) for n, part in zip(names, parts)}

    def plain(self, key: str, value: torch.Tensor) -> dict | None:
        """An expert projection kept in 16 or 32 bits (a 3D weight, written as stored), or None for a
        tensor that is no experts' weight."""
        owner, _, leaf = key.rpartition(".")
        if owner not in self.modules or value.dim() != 3:
            return None
        data, qtype = plain_array(value)
        return {n: (d, qtype) for n, d in self.split(owner, leaf, data).items()}

    def check(self, layers: dict, nearest: bool) -> None:
        """One type per projection and block: refuse a mix, or with ``nearest`` re-quantize it into one."""
        groups: dict[tuple[str, str], list] = {}
        for name, (owner, p, _) in self.where.items():
            groups.setdefault((owner, p), []).append(layers[name])
        for (owner, p), items in groups.items():
            kinds = {it.kind for it in items}
            if all(it.exact for it in items) and len(kinds) == 1:
                continue
            if not nearest:
                by_format: dict[str, list[int]] = {}
                for e, it in enumerate(items):
                    by_format.setdefault(f"{it.source} -> {it.kind.name}", []).append(e)
                mix = "; ".join(f"{f} (experts {', '.join(map(str, es))})" for f, es in by_format.items())
                raise AmpqError(f"cannot export {self.directory} to GGUF: the experts of {owner}.{p} are of "
                                f"{len(by_format)} types ({mix}), but llama.cpp holds every expert of one projection "
                                "in one tensor of one type; quantize them with one format, or pass --nearest "
                                "(nearest=True) to re-quantize them with gguf-py into the widest of those types")
            types = set()
            for it in items:
                types.update(it.kind if isinstance(it.kind, tuple) else (it.kind,))
            target = common_type(types)
            for it in items:
                if not (it.exact and it.kind == target):
                    it.exact, it.kind, it.widened = False, (target,), False

    def stack(self, tensors: dict) -> dict:
        """The tensors with each projection's experts, (name, expert) -> rows, stacked into one 3D
        tensor under its name, where its first expert was."""
        parts: dict[str, dict[int, tuple]] = {}
        out: dict = {}
        for key, value in tensors.items():
            if isinstance(key, tuple):
                name, e = key
                if name not in parts:
                    parts[name] = {}
                    out[name] = None
                parts[name][e] = value
            else:
                out[key] = value
        for name, by_expert in parts.items():
            items = [by_expert[e] for e in sorted(by_expert)]
            qtypes = {q for _, q in items}
            if len(qtypes) != 1 or sorted(by_expert) != list(range(len(items))):
                raise AmpqError(f"internal error: the experts of {name} came out as {sorted(q.name for q in qtypes)} "
                                f"for experts {sorted(by_expert)}; please report it, with the checkpoint's ampq.json")
            out[name] = (np.stack([d for d, _ in items]), qtypes.pop())
        return out

    def is_router(self, gguf_type) -> bool:
        return gguf_type in ROUTERS
