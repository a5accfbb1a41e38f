"""How a hub checkpoint names each expert's weights, family by family: transformers 5 fuses them
on load into 3D parameters (``mlp.experts.gate_up_proj`` [experts, 2 x intermediate, hidden]) and
writes them back one by one on save (``block_sparse_moe.experts.3.w1.weight`` for Mixtral,
``mlp.experts.3.gate_proj.weight`` for Qwen2/3-MoE, OLMoE and DeepSeek-V3). vLLM's MoE loaders
and compressed-tensors checkpoints use those per-expert names; gpt-oss and Llama-4 checkpoints
keep their experts fused (transposed, gpt-oss interleaved with biases), so no per-expert names
are given for them."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubExperts:
    """One family's per-expert naming: the leaf names of gate, up and down, and the hub's name for
    the block that transformers calls ``mlp`` (None where it is the same)."""

    gate: str
    up: str
    down: str
    block: str | None = None

    @property
    def leaves(self) -> tuple[str, str, str]:
        return self.gate, self.up, self.down


_STANDARD = HubExperts("gate_proj", "up_proj", "down_proj")

# model_type -> naming; what transformers' conversion mapping reverts on save (checked by
# tests/test_moe_export.py against save_pretrained's own keys)
FAMILIES = {
    "mixtral": HubExperts("w1", "w3", "w2", block="block_sparse_moe"),
    "qwen2_moe": _STANDARD,
    "qwen3_moe": _STANDARD,
    "olmoe": _STANDARD,
    "deepseek_v3": _STANDARD,
}

# families whose experts no per-expert name serves, and why (for refusals)
FUSED = {
    "gpt_oss": "gpt-oss checkpoints keep their experts fused, interleaved and transposed, with biases "
               "(vLLM reads them as MXFP4 or 16-bit 3D weights, not as per-expert compressed-tensors layers)",
    "llama4_text": "Llama-4 checkpoints keep their experts fused and transposed, and ampq has not verified vLLM's "
                   "per-expert compressed-tensors path for them",
}


def hub_experts(model_type: str | None) -> HubExperts | None:
    return FAMILIES.get(model_type or "")


def to_hub(key: str, naming: HubExperts) -> str:
    """A transformers 5 tensor or module name as the hub checkpoint writes it."""
    return key.replace(".mlp.", f".{naming.block}.") if naming.block else key


def from_hub(key: str, naming: HubExperts) -> str:
    """Inverse of :func:`to_hub`."""
    return key.replace(f".{naming.block}.", ".mlp.") if naming.block else key


def expert_modules(experts_name: str, e: int, naming: HubExperts) -> tuple[str, str, str]:
    """The hub's module names of expert ``e``'s gate, up and down projections, for the experts
    module transformers 5 names ``experts_name`` (``model.layers.0.mlp.experts``)."""
    base = to_hub(f"{experts_name}.{e}", naming)
    return tuple(f"{base}.{leaf}" for leaf in naming.leaves)
