"""Sensitivity of expert projections: one row of the table per 3D expert weight
(``model.layers.0.mlp.experts.gate_up_proj``), its damage the sum over its experts of each
expert's own (each with the Hessian of the tokens routed to it, and its own Fisher weights), its
bytes those of every expert. An expert calibration reached too little is measured as quantizing
will treat it: rounded to nearest (:data:`ampq.calibrate.MIN_EXPERT_TOKENS`); one no token
reached does no damage on this text and counts for its bytes only."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ampq.algorithms import NEEDS_CALIBRATION
from ampq.calibrate import MIN_EXPERT_TOKENS
from ampq.experts import experts_modules, projections
from ampq.fisher import fisher_damage
from ampq.models import replace_module
from ampq.quant_experts import QuantExperts


def measure_experts(prefix: str, block: nn.Module, cal, cands, fisher, estimates, nbytes, shapes) -> None:
    """Add every expert projection of ``block`` to ``estimates`` (estimator -> layer -> candidate ->
    damage), ``nbytes`` and ``shapes`` (experts x out, in), measured on ``cal``'s current inputs."""
    for sub, module in experts_modules(block).items():
        experts = module if isinstance(module, QuantExperts) else QuantExperts(module)
        replace_module(block, sub, experts)
        try:
            for projection in experts.names:
                _measure(f"{prefix}.{sub}.{projection}", experts, projection,
                         cal.expert_stats(block, sub, projection), cands, fisher, estimates, nbytes, shapes)
        finally:
            replace_module(block, sub, module)


def _measure(name, experts, projection, stats, cands, fisher, estimates, nbytes, shapes) -> None:
    out, inp = experts.shapes[projection]
    shapes[name] = [experts.num_experts * out, inp]
    nbytes[name] = {}
    for table in estimates.values():
        table[name] = {}
    weights = {e: experts.expert_weight(projection, e) for e in stats}
    for cand in cands:
        hessian = fisher_total = 0.0
        try:
            for e, s in stats.items():
                short = (cand.algorithm in NEEDS_CALIBRATION or cand.clip) and s.count < MIN_EXPERT_TOKENS
                used = dataclasses.replace(cand, algorithm="rtn", clip=False) if short else cand
                dw = weights[e] - used.dequantized(weights[e], s).float()
                rows = ((dw @ s.hessian.float()) * dw).sum(1)
                hessian += float(rows.sum())
                if fisher is not None:
                    fisher_total += fisher_damage(rows, fisher[name][e])
        except ValueError:
            continue  # a format these experts cannot take is simply not a choice for them
        estimates["hessian"][name][cand.name] = hessian
        if fisher is not None:
            estimates["fisher"][name][cand.name] = fisher_total
        nbytes[name][cand.name] = experts.num_experts * cand.nbytes((out, inp))


def expert_projection_names(model: nn.Module) -> list[str]:
    """Every 3D expert weight of ``model``'s experts modules, by the name a plan gives it."""
    return [f"{owner}.{p}" for owner, module in experts_modules(model).items()
            for p in (module.names if isinstance(module, QuantExperts) else projections(module))]


def expert_weight_bytes(model: nn.Module, name: str) -> int:
    """Bytes of the float 3D expert weight ``name``."""
    p: torch.Tensor = model.get_parameter(name)
    return p.numel() * p.element_size()
