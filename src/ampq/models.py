"""Finding things in a transformers model: its stack of blocks (a decoder's, an encoder's, the
language model's of a vision-language model), its output head, whether the head shares the
embedding's weight, whether it is an encoder; and putting a module in another's place. Knows nothing of
quantization or files (the loader is :mod:`ampq.loading`)."""

from __future__ import annotations

import copy
import inspect

from torch import nn

from ampq.errors import AmpqError


def _size(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, m in model.named_modules() if m is target), None)


def multimodal(model: nn.Module) -> bool:
    """Whether ``model`` has a vision or audio tower beside its language model."""
    config = getattr(model, "config", None)
    return any(getattr(config, k, None) is not None for k in ("vision_config", "audio_config"))


def language_model_name(model: nn.Module) -> str | None:
    """The module name of the text decoder of a vision-language model (None for other models)."""
    if not multimodal(model) or not hasattr(model, "get_decoder"):
        return None
    decoder = model.get_decoder()
    return _module_name(model, decoder) if isinstance(decoder, nn.Module) and decoder is not model else None


def _stacks(model: nn.Module) -> list[tuple[str, int]]:
    """(name, size) of each outermost non-empty nn.ModuleList: the stacks of repeated blocks."""
    found: list[tuple[str, int]] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and \
                not any(name.startswith(f"{n}.") for n, _ in found):
            found.append((name, _size(module)))
    return found


# another stack at least this share of the chosen one's size is a second model part (an encoder-
# decoder's other half), not a small helper list: quantizing one stack would leave it silently
SECOND_STACK = 0.1


def block_stack(model: nn.Module) -> str:
    """The module name of the stack of blocks ampq quantizes: the repeated layers of a decoder-only
    LM or an encoder, the language model's of a vision-language model (its vision tower is kept).
    A model with two comparable stacks that is not one of these is refused, naming them."""
    stacks = _stacks(model)
    if not stacks:
        raise AmpqError(f"found no decoder blocks (an nn.ModuleList of layers) in {type(model).__name__}; ampq "
                        "quantizes transformers made of a stack of blocks")
    text = language_model_name(model)
    inside = [s for s in stacks if text is not None and s[0].startswith(f"{text}.")]
    best, size = max(inside or stacks, key=lambda s: s[1])
    others = [s for s in stacks if s[0] != best and s[1] >= SECOND_STACK * size and not inside]
    if others:
        found = "; ".join(f"{n}: {len(model.get_submodule(n))} blocks, {k / 1e6:.2f}M parameters"
                          for n, k in sorted(stacks, key=lambda s: -s[1]) if k >= SECOND_STACK * size)
        raise AmpqError(f"{type(model).__name__} has {len(others) + 1} stacks of blocks ({found}); ampq quantizes "
                        "one (a decoder-only LM, an encoder, or the language model of a vision-language model) and "
                        "would leave the rest in full precision: this block structure is not supported")
    return best


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each repeated transformer block that ampq quantizes (:func:`block_stack`)."""
    best = block_stack(model)
    return [(f"{best}.{i}", block) for i, block in enumerate(model.get_submodule(best))]


def kept_towers(model: nn.Module) -> list[str]:
    """Module names of a vision-language model's parts outside its language model (vision tower,
    projector), which quantization keeps as they are."""
    text = language_model_name(model)
    if text is None:
        return []
    parent = text.rpartition(".")[0]
    siblings = model.get_submodule(parent).named_children() if parent else model.named_children()
    prefix = f"{parent}." if parent else ""
    return [f"{prefix}{n}" for n, m in siblings if f"{prefix}{n}" != text and _size(m) > 0]


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


def last_logits_only(model: nn.Module) -> dict:
    """The keyword that makes a causal language model compute the logits of the last position only,
    where its forward takes one (``logits_to_keep``; ``num_logits_to_keep`` before transformers
    4.50): a prompt's other logits are never read, and the head over every position of a long
    prompt costs as much as a few of its blocks."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return {name: 1}
    return {}


def copy_sharing_embeddings(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` that holds the same input embedding table (and so a tied head's),
    not a copy of it: the largest tensor that quantizing a copy replaces but never changes in place,
    kept once however many copies are made to compare schemes."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    return copy.deepcopy(model, {id(weight): weight} if isinstance(weight, nn.Parameter) else {})


def tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if head is not None and getattr(head, "table", None) is not None and head.table is emb:
        return True  # a quantized table read as the head too (ampq.quant_embedding.TiedQuantHead)
    return (head is not None and emb is not None and isinstance(head, nn.Linear)
            and head.weight is emb.weight)


def is_encoder(model: nn.Module) -> bool:
    """Whether ``model`` makes embeddings rather than next tokens (a BERT-style encoder): it cannot
    generate, so its quality is that of its embeddings, not a next-token loss."""
    can = getattr(model, "can_generate", None)
    return callable(can) and not can() and not getattr(getattr(model, "config", None), "is_decoder", False)


def linear_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
