"""An expert projection held at several precisions: every expert's matrix of one projection
(``mlp.experts.down_proj``) is a :class:`~ampq.nested.NestedLinear` inside its
:class:`~ampq.quant_experts.QuantExperts`, and the projection switches level as one unit, the unit
its plan and its layer-table record describe (one format per projection, as for a quantized one).

A :class:`NestedProjection` is a view, not a module: it holds no tensors, reads its levels, bytes and
damage from the experts' layers, and moves all of them together; the experts module keeps running
each token through the experts it was routed to, whatever level they hold.
"""

from __future__ import annotations

from torch import nn

from ampq.nested import NestedLinear
from ampq.quant_experts import QuantExperts, quantized_projections


class NestedProjection:
    """Projection ``name`` of ``experts``, whose every expert is a NestedLinear of the same levels."""

    def __init__(self, experts: QuantExperts, name: str):
        self.experts_module, self.name = experts, name
        self.layers: list[NestedLinear] = list(experts.quantized(name))

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in) of one expert's matrix."""
        return self.layers[0].shape

    @property
    def numel(self) -> int:
        return len(self.layers) * self.shape[0] * self.shape[1]

    @property
    def level(self) -> int:
        return self.layers[0].level

    @property
    def levels(self) -> int:
        return self.layers[0].levels

    @property
    def residual_formats(self) -> list[str]:
        return self.layers[0].residual_formats

    @property
    def damage(self) -> list[float] | None:
        """Each level's estimated damage, summed over the experts (each weighted by the tokens
        routed to it, so the sum is the projection's share of the KL per token)."""
        return summed_damage(self.layers, self.levels)

    def level_bytes(self, level: int) -> int:
        return sum(m.level_bytes(level) for m in self.layers)

    def nbytes(self) -> int:
        return sum(m.nbytes() for m in self.layers)

    def set_level(self, level: int) -> None:
        for m in self.layers:
            m.set_level(level)


def summed_damage(layers: list[NestedLinear], levels: int) -> list[float] | None:
    """The first ``levels`` levels' damage of one projection: each expert's, summed; None when an
    expert's is unknown."""
    if any(m.damage is None for m in layers):
        return None
    return [sum(m.damage[k] for m in layers) for k in range(levels)]


def is_nested_projection(experts: QuantExperts, name: str) -> bool:
    layers = experts.quantized(name)
    return layers is not None and all(isinstance(m, NestedLinear) for m in layers)


def nested_projections(model: nn.Module) -> dict[str, NestedProjection]:
    """Every adaptive expert projection of ``model`` by name."""
    return {name: NestedProjection(m, p) for name, (m, p) in quantized_projections(model).items()
            if is_nested_projection(m, p)}
