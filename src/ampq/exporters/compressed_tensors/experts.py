"""Mixture-of-experts experts in a compressed-tensors checkpoint, as vLLM's MoE loaders read them:
one layer per expert and projection under the hub checkpoint's names
(``model.layers.0.block_sparse_moe.experts.3.w1`` for Mixtral, ``...mlp.experts.3.gate_proj``
for Qwen2/3-MoE, OLMoE and DeepSeek-V3; :mod:`ampq.expert_names`), not transformers 5's fused 3D
``gate_up_proj``. Each expert's gate/up is cut into its gate rows and its up rows, each written by
compressed-tensors' own compressor; experts kept in 16 bits are cut the same way.

vLLM runs every expert of one MoE layer with one scheme (it asks for the scheme of
``experts.0.gate_proj``, ``.0.up_proj`` and ``.0.down_proj`` and refuses a mix), so gate/up and
down of a layer must share their scheme, or both stay in 16 bits; its routers are never
quantized. Its names for a Mixtral layer (``experts.0.gate_proj``) differ from the checkpoint's
(``experts.0.w1``), so the config names each layer's experts by one pattern that covers both.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.expert_names import FUSED, expert_modules, hub_experts, to_hub
from ampq.experts import experts_modules, is_router
from ampq.quant_experts import quantized_projections

_VLLM_LEAVES = ("gate_proj", "up_proj", "down_proj")  # the names vLLM asks for, whatever the family


class Experts:
    """The experts of one model on their way into a compressed-tensors checkpoint."""

    def __init__(self, model: nn.Module, directory):
        self.model_type = getattr(getattr(model, "config", None), "model_type", None)
        self.modules = {n: m for n, m in experts_modules(model).items()}
        projections = quantized_projections(model)
        self.naming = hub_experts(self.model_type) if self.modules else None
        if projections and self.naming is None:
            why = FUSED.get(self.model_type or "", f"ampq knows no per-expert names for {self.model_type!r} checkpoints")
            raise AmpqError(f"{directory} holds quantized experts ({next(iter(projections))}), which vLLM's "
                            f"compressed-tensors MoE path does not take from ampq: {why}; serve it with ampq "
                            "(ampq.load or from_pretrained after import ampq), or quantize the linears only "
                            '({"*.experts.*": None, "*": FORMAT})')
        # an expert's QuantLinear by its name in the model -> the hub names of the layers it becomes
        self.parts: dict[str, tuple[str, ...]] = {}
        self.layers: dict[str, nn.Module] = {}
        for name, (experts, p) in projections.items():
            if experts.transposed or set(experts.names) != {"gate_up_proj", "down_proj"}:
                raise AmpqError(f"{directory}: the experts at {name.rpartition('.')[0]} hold {experts.names}"
                                f"{' transposed' if experts.transposed else ''}, not the gate_up_proj / down_proj "
                                f"of {self.model_type} checkpoints; the export cannot name them")
            owner = name.rpartition(".")[0]
            for e, layer in enumerate(experts.quantized(p)):
                gate, up, down = expert_modules(owner, e, self.naming)
                self.parts[f"{name}.{e}"] = (gate, up) if p == "gate_up_proj" else (down,)
                self.layers[f"{name}.{e}"] = layer

    def hub(self, name: str) -> str:
        return to_hub(name, self.naming) if self.naming else name

    def linears(self, model: nn.Module, quantized: dict) -> list[str]:
        """Every linear the checkpoint holds, in the model's order, by its hub name (each expert's
        three projections where the model has experts)."""
        names = []
        for name, module in model.named_modules():
            if name in quantized or isinstance(module, nn.Linear):
                names.append(self.hub(name))
            elif name in self.modules and self.naming is not None:
                for e in range(_count(module)):
                    names.extend(expert_modules(name, e, self.naming))
        return names

    def rows(self, name: str, layer: nn.Module) -> list[int]:
        """How an expert layer's outputs are cut: gate/up in two halves, down whole."""
        return [layer.shape[0] // 2] * 2 if len(self.parts[name]) == 2 else [layer.shape[0]]

    def plain(self, key: str, value: torch.Tensor) -> dict:
        """A tensor of no quantized layer under its hub name; a 3D expert weight kept in 16 bits
        cut into each expert's projections."""
        owner, _, leaf = key.rpartition(".")
        if self.naming is None or owner not in self.modules or value.dim() != 3:
            return {self.hub(key): value}
        if leaf not in ("gate_up_proj", "down_proj"):
            raise AmpqError(f"{key}: a 3D expert weight the {self.model_type} checkpoint has no per-expert name for")
        out = {}
        for e in range(value.shape[0]):
            gate, up, down = expert_modules(owner, e, self.naming)
            if leaf == "gate_up_proj":
                g, u = value[e].chunk(2, dim=0)
                out.update({f"{gate}.weight": g.contiguous(), f"{up}.weight": u.contiguous()})
            else:
                out[f"{down}.weight"] = value[e]
        return out

    def by_hub_name(self, layers: dict) -> dict:
        """The decided layers by the hub names of what they become (an expert's gate/up twice)."""
        items = {}
        for name, it in layers.items():
            for hub in self.parts.get(name, (self.hub(name),)):
                items[hub] = it
        return items

    def check(self, layers: dict, model: nn.Module) -> dict[str, str]:
        """Refuse what vLLM cannot run (a MoE layer with two schemes, a quantized router); return the
        pattern each expert's hub name is written as in the config (targets and ignore)."""
        for name, it in layers.items():
            if name not in self.parts and it.kind is not None and is_router(model, name):
                raise AmpqError(f"{name} is a router quantized as {it.source}; vLLM runs MoE routers unquantized: "
                                "keep routers in 16 bits (ampq's default) and export again")
        kinds = {}
        for owner, module in self.modules.items():
            schemes = {}
            for p in ("gate_up_proj", "down_proj"):
                quantized = module.quantized(p) if hasattr(module, "quantized") else None
                if quantized is None:
                    schemes.setdefault(None, f"{p} is kept in 16 bits")
                    continue
                for e in range(len(quantized)):
                    it = layers[f"{owner}.{p}.{e}"]
                    schemes.setdefault(it.kind, f"{p} of expert {e} is {it.source} "
                                                f"({it.kind.describe() if it.kind else 'unquantized'})")
            if len(schemes) > 1:
                raise AmpqError(f"{owner}: vLLM runs the experts of one MoE layer with one scheme, but "
                                f"{', '.join(schemes.values())}; quantize gate_up_proj and down_proj of the experts "
                                "with one format (or keep both in 16 bits) and export again")
            kinds[owner] = next(iter(schemes))
        return self._patterns(kinds) if self.naming is not None else {}

    def _patterns(self, kinds: dict) -> dict[str, str]:
        """Each expert's hub name -> the pattern of its MoE layer's experts, with vLLM's names beside
        the checkpoint's; one pattern over all blocks where every MoE layer has the same scheme."""
        leaves = "|".join(dict.fromkeys(self.naming.leaves + _VLLM_LEAVES))
        same = len(set(kinds.values())) == 1
        patterns = {}
        for owner, module in self.modules.items():
            prefix = _escaped(self.hub(owner), any_block=same)
            pattern = rf"re:{prefix}\.\d+\.({leaves})$"
            for e in range(_count(module)):
                for hub in expert_modules(owner, e, self.naming):
                    patterns[hub] = pattern
        return patterns


def _count(module: nn.Module) -> int:
    return getattr(module, "num_experts", None) or next(p for p in module.parameters() if p.dim() == 3).shape[0]


def _escaped(name: str, any_block: bool) -> str:
    parts = [r"\d+" if any_block and part.isdigit() else re.escape(part) for part in name.split(".")]
    return r"\.".join(parts)
