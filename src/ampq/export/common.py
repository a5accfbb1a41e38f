"""What every exporter needs to know about an ampq layer."""

from __future__ import annotations

from torch import nn


def base_of(layer: nn.Module) -> nn.Module:
    """The QuantLinear that holds the layer's format (an adaptive layer's base)."""
    return getattr(layer, "base", layer)


def source_of(layer: nn.Module) -> str:
    """What ampq stores for ``layer``, for messages: "int4-g128", "int4-g128 + input scale", ..."""
    base = base_of(layer)
    text = layer.format_name
    if base.activation:
        text += f" + {base.activation} activations"
    if base.input_scale is not None:
        text += " + input scale"
    return text
