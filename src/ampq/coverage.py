"""What a quantized model quantized and what it kept, in one line:

    quantized 96.1% of the weights: 168 linears + 24 x 128 experts; kept: embeddings, norms, router, head

Weights are every parameter's elements (a quantized layer counted by the weights it stands for,
a tied head once). Everything kept is named by what it is, so no part of a model is left out
without a word. :func:`ampq.save` writes the same record into the manifest; ``ampq inspect`` shows it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from ampq.experts import is_experts, is_router
from ampq.models import kept_towers, lm_head_name
from ampq.nn import quantized_linears
from ampq.quant_embedding import quantized_embeddings
from ampq.quant_experts import quantized_experts


@dataclass
class Coverage:
    weights: int  # every weight of the model
    quantized: int  # those stored in a quantized format
    linears: int  # quantized linears (adaptive ones included)
    experts: list[int] = field(default_factory=list)  # the number of experts of each quantized experts module
    kept: dict[str, int] = field(default_factory=dict)  # what was kept -> its weights, largest first
    embeddings: list[str] = field(default_factory=list)  # the formats of quantized embedding tables

    @property
    def share(self) -> float:
        return self.quantized / self.weights if self.weights else 0.0

    def line(self) -> str:
        parts = [f"{self.linears} linears"] if self.linears else []
        for count in sorted(set(self.experts)):
            parts.append(f"{self.experts.count(count)} x {count} experts")
        parts += [f"embeddings ({f})" for f in self.embeddings]
        made = " + ".join(parts) or "nothing"
        kept = ", ".join(self.kept) or "nothing"
        return f"quantized {100 * self.share:.1f}% of the weights: {made}; kept: {kept}"

    def to_dict(self) -> dict:
        return {**asdict(self), "line": self.line()}


def coverage(model: nn.Module) -> Coverage:
    """What ``model`` holds quantized and what it kept (see the module's docstring)."""
    linears = quantized_linears(model)
    experts = quantized_experts(model)
    quantized = sum(m.in_features * m.out_features for m in linears.values())
    quantized += sum(e.num_experts * e.shapes[p][0] * e.shapes[p][1]
                     for e in experts.values() for p in e.names if e.quantized(p) is not None)
    tables = quantized_embeddings(model)
    quantized += sum(m.in_features * m.out_features for m in tables.values())
    head = lm_head_name(model, required=False)
    towers = kept_towers(model)
    kept: dict[str, int] = {}
    seen: set[int] = set()
    inside = tuple(f"{n}." for n in linears)
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen or name.startswith(inside):
            continue
        seen.add(id(p))
        tower = next((t for t in towers if name.startswith(f"{t}.")), None)
        # a vision-language model's vision tower and projector, by the names the model gives them
        what = tower.rpartition(".")[2] if tower is not None else _kind(model, name, head)
        kept[what] = kept.get(what, 0) + p.numel()
    kept = dict(sorted(kept.items(), key=lambda kv: -kv[1]))
    return Coverage(quantized + sum(kept.values()), quantized, len(linears),
                    [e.num_experts for e in experts.values() if any(e.quantized(p) is not None for p in e.names)],
                    kept, [m.format_name for m in tables.values()])


def _kind(model: nn.Module, name: str, head: str | None) -> str:
    """What the parameter ``name`` belongs to, in the words of the summary."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if head is not None and owner == head:
        return "head"
    if isinstance(module, nn.Embedding):
        return "embeddings"
    if "norm" in type(module).__name__.lower():
        return "norms"
    if is_experts(module):
        return "expert biases" if leaf.endswith("_bias") else "experts"
    if is_router(model, owner) or "router" in type(module).__name__.lower():
        return "router"
    if leaf == "bias":
        return "biases"
    if isinstance(module, nn.Linear):
        return "linears"
    return leaf  # named as the model names it (gpt-oss's attention "sinks", ...)
