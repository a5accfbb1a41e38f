"""Mixture-of-experts blocks in a transformers model: the modules that keep their experts as 3D
weights (transformers 5: ``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden] and
``mlp.experts.down_proj``), the shape of one expert's projection, and the routers beside them.
Knows nothing of quantization (that is :mod:`ampq.quant_experts`)."""

from __future__ import annotations

import inspect

from torch import nn

# the 3D weights an experts module may hold, in the order a token passes them
PROJECTIONS = ("gate_up_proj", "up_proj", "down_proj")
# names the routers of transformers' MoE blocks go by, where they are linears (Llama-4's router,
# Qwen2-MoE's shared-expert gate); the others hold a raw weight and are no linear at all
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")


def projections(module: nn.Module) -> list[str]:
    """The 3D expert weights ``module`` holds directly, in the order a token passes them."""
    params = module._parameters
    return [p for p in PROJECTIONS if params.get(p) is not None and params[p].dim() == 3]


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` keeps its experts as 3D weights (one per projection, stacked)."""
    return getattr(module, "is_quantized_experts", False) or "down_proj" in projections(module)


def transposed(module: nn.Module) -> bool:
    """Whether the 3D weights are stored [experts, in, out] (gpt-oss, Llama-4) rather than
    [experts, out, in]: transformers' decorator says so where it is applied; Llama-4's experts
    carry no flag, and their hidden size tells (the input of the first projection)."""
    flag = getattr(module, "is_transposed", None)
    if isinstance(flag, bool):
        return flag
    hidden = getattr(module, "hidden_size", None) or getattr(module, "hidden_dim", None)
    first = module._parameters[projections(module)[0]]
    return hidden is not None and first.shape[1] == hidden and first.shape[2] != hidden


def expert_shape(module: nn.Module, name: str) -> tuple[int, int]:
    """(out, in) of one expert's projection ``name``."""
    shape = tuple(module._parameters[name].shape[1:])
    return (shape[1], shape[0]) if transposed(module) else shape


def routes_tokens(module: nn.Module) -> bool:
    """Whether the experts' forward takes the routing (hidden states, top-k indices, top-k weights);
    Llama-4's takes only hidden states, already repeated once per expert and scaled by its score."""
    forward = type(module).forward
    forward = getattr(forward, "__wrapped__", forward)
    return len(inspect.signature(forward).parameters) >= 4


def experts_modules(root: nn.Module) -> dict[str, nn.Module]:
    """Every experts module under ``root`` by name (relative to ``root``)."""
    return {name: m for name, m in root.named_modules() if is_experts(m)}


def is_router(root: nn.Module, name: str) -> bool:
    """Whether the module ``name`` of ``root`` routes tokens to experts (kept in 16 bits unless asked)."""
    parent, _, leaf = name.rpartition(".")
    if leaf not in ROUTER_NAMES:
        return False
    owner = root.get_submodule(parent) if parent else root
    return any(is_experts(m) for m in owner.children())
