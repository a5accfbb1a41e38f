"""Replace the linears of a model's decoder blocks by QuantLinear, block by block."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.algorithms import get_algorithm
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.models import decoder_blocks, lm_head_name
from ampq.nn import QuantLinear

FormatSpec = str | Mapping[str, str | None]


def format_for(name: str, spec: FormatSpec) -> str | None:
    """The format a layer gets: a single name for all, or the first fnmatch pattern that matches
    (torchao-style per-module map; ``None`` keeps the layer as it is)."""
    if isinstance(spec, str):
        return spec
    for pattern, fmt in spec.items():
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    return None


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def quantize_linear(name: str, linear: nn.Linear, fmt_name: str, algorithm: str = "rtn",
                    stats=None) -> QuantLinear:
    weight = linear.weight.detach()
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise AmpqError(f"layer {name} has {bad} NaN/Inf weights; repair or re-export the checkpoint before quantizing")
    fmt = get_format(fmt_name)
    try:
        codes, params = get_algorithm(algorithm)(weight.float(), fmt, stats)
    except ValueError as e:
        raise AmpqError(f"layer {name} cannot be stored as {fmt_name}: {e}") from None
    return QuantLinear.from_linear(linear, fmt_name, codes, params, algorithm)


def quantize(model: nn.Module, formats: FormatSpec, *, algorithm: str = "rtn",
             lm_head: bool = False, progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``formats``: one format name for every linear of the decoder blocks, or a map from fnmatch
    patterns over module names to format names (first match wins, ``None`` skips). Embeddings and
    norms are never touched; the output head only with ``lm_head=True`` (a tied head is untied).
    Blocks are done one at a time so peak memory stays near the model plus one block.
    """
    if isinstance(formats, str):
        get_format(formats)  # fail on a bad name before any work
    else:
        for f in formats.values():
            if f is not None:
                get_format(f)
    blocks = decoder_blocks(model)
    for prefix, block in tqdm(blocks, desc=f"quantize ({algorithm})", unit="block", disable=not progress):
        for sub, module in list(block.named_modules()):
            if not isinstance(module, nn.Linear):
                continue
            name = f"{prefix}.{sub}"
            fmt = format_for(name, formats)
            if fmt is not None:
                _replace(model, name, quantize_linear(name, module, fmt, algorithm))
    if lm_head:
        head = lm_head_name(model)
        module = model.get_submodule(head)
        fmt = format_for(head, formats)
        if isinstance(module, nn.Linear) and fmt is not None:
            if getattr(model.config, "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
            _replace(model, head, quantize_linear(head, module, fmt, algorithm))
    return model


def quantized_layers(model: nn.Module) -> dict[str, QuantLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
