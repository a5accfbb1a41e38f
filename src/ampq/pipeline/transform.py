"""Transforms applied to the float model before sensitivity is measured, so that every candidate of
every layer is measured, allocated and quantized on the same weights.

``awq``: AWQ's per-input-channel rescaling (:func:`ampq.algorithms.awq.awq_block`), searched for one
format and folded into the op before each group of linears (or kept as an explicit input scale). The
float model computes what it computed before; its weights are easier to quantize. Applied after the
plan is made (the older way), the scales cannot change which layer got which format; applied first,
the allocation sees what each candidate costs on the weights it will quantize.
"""

from __future__ import annotations

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.algorithms.awq import awq_block
from ampq.calibrate import Calibration
from ampq.errors import AmpqError
from ampq.formats import get_format

TRANSFORMS = ("none", "awq")
# the format AWQ's scales are searched for: 4 bits is where a budget near 4 bits puts most layers,
# and scales that protect salient channels at 4 bits protect them at 3 and 5 too
AWQ_SEARCH_FORMAT = "int4-g128"


@torch.no_grad()
def apply_transform(model: nn.Module, name: str, calibration, *, search_format: str = AWQ_SEARCH_FORMAT,
                    batch_size: int = 8, progress: bool = True) -> dict:
    """Apply transform ``name`` to ``model`` in place; returns what it chose (for the manifest)."""
    if name not in TRANSFORMS:
        raise AmpqError(f"unknown transform {name!r}; choose one of {', '.join(TRANSFORMS)}")
    if name == "none":
        return {"name": "none"}
    get_format(search_format)
    tokens = getattr(calibration, "tokens", calibration)
    cal = Calibration(model, tokens, batch_size)
    alphas = {}
    for prefix, block in tqdm(cal.blocks, desc="awq transform", unit="block", disable=not progress):
        targets = {sub: search_format for sub, m in block.named_modules() if isinstance(m, nn.Linear)}
        for group, alpha in awq_block(block, cal, targets).items():
            alphas[f"{prefix}:{group}"] = alpha
        cal.advance(block)
    return {"name": "awq", "search_format": search_format, "alphas": alphas}


def ensure_transform(model: nn.Module, name: str, calibration, *, progress: bool = True) -> dict:
    """Apply transform ``name`` unless ``model`` already had it (a plan made on this model object
    transformed it; a plan read from a file, or a fresh model, did not). The record stays on the
    model's config, so it is saved with the checkpoint."""
    done = getattr(model.config, "ampq_transform", None)
    if done is not None:
        if done.get("name") != name:
            raise AmpqError(f"this model was transformed with {done.get('name')!r}, not {name!r}; start from the "
                            "unquantized model")
        return done
    record = apply_transform(model, name, calibration, progress=progress)
    if name != "none":
        model.config.ampq_transform = record
    return record
