"""Finding things in a transformers model: its decoder blocks, its output head, whether the head
shares the embedding's weight; and putting a module in another's place. Knows nothing of
quantization or files (the loader is :mod:`ampq.loading`)."""

from __future__ import annotations

from torch import nn

from ampq.errors import AmpqError


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each repeated transformer block: the ModuleList holding most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
            if n > best_params:
                best, best_params = name, n
    if best is None:
        raise AmpqError(f"found no decoder blocks (an nn.ModuleList of layers) in {type(model).__name__}")
    blocks = model.get_submodule(best)
    return [(f"{best}.{i}", block) for i, block in enumerate(blocks)]


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def lm_head_name(model: nn.Module, required: bool = True) -> str | None:
    """The module name of ``model``'s output head; without one, an error (or None where not ``required``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        for name, module in model.named_modules():
            if module is head:
                return name
    if not required:
        return None
    raise AmpqError(f"{type(model).__name__} has no output head (lm_head) to quantize")


_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def fused_groups(names: list[str]) -> list[list[str]]:
    """The linears that serving engines fuse into one (q/k/v of a block, gate/up), among ``names``
    (module names, full or relative to a block): groups of two or more."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        kind = _FUSED.get(leaf)
        if kind and not prefix.endswith("experts"):  # an experts module's up_proj is no dense MLP's
            groups.setdefault((prefix.rpartition(".")[0], kind), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (head is not None and emb is not None and isinstance(head, nn.Linear)
            and head.weight is emb.weight)


def linear_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
