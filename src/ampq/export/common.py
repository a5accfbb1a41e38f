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
    if base.input_perm is not None:
        text += " + act-order input permutation"
    return text


def owner_of(key: str, layers) -> str | None:
    """The longest prefix of the tensor name ``key`` that is one of ``layers`` (its layer), or None."""
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in layers:
            return prefix
    return None


def inexact_by_source(inexact: list) -> tuple[dict[str, list], list[str]]:
    """Layers an export cannot hold exactly (each with ``source``, ``name``, ``why``), grouped by what
    ampq stores for them, and one phrase per group for the error that lists them."""
    by_source: dict[str, list] = {}
    for it in inexact:
        by_source.setdefault(it.source, []).append(it)
    parts = [f"{src} ({len(its)} layer{'s' if len(its) > 1 else ''}, e.g. {its[0].name}: {its[0].why})"
             for src, its in by_source.items()]
    return by_source, parts


def change_summary(converted: dict[str, dict]) -> dict:
    """Over the re-quantized layers (each with ``max_abs_change``, ``mean_abs_change``, ``weights``):
    the largest change, the weight-averaged mean change, and the phrase the summary line uses."""
    weights = sum(c["weights"] for c in converted.values())
    top = max((c["max_abs_change"] for c in converted.values()), default=0.0)
    mean = sum(c["mean_abs_change"] * c["weights"] for c in converted.values()) / weights if weights else 0.0
    text = f", {len(converted)} re-quantized (max |dW| {top:.3g}, mean {mean:.3g})" if converted else ""
    return {"max_abs_change": top, "mean_abs_change": mean, "change_text": text}
