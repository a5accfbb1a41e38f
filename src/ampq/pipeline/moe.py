"""The experts of a mixture-of-experts block, quantized: each expert's projection as its own
matrix, with (for GPTQ and clip search) the Hessian of the tokens the router sent it.

Calibration uses the real routing: the block runs as it would, and each expert's inputs are the
tokens routed to it (llm-compressor's other practice, sending every token through every expert,
gives experts statistics of tokens they never see). An expert that got fewer than
``MIN_EXPERT_TOKENS`` is rounded to nearest instead (its Hessian would fit the error feedback to a
handful of tokens), and the run counts them (:class:`ExpertCounts`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import nn

from ampq.algorithms import NEEDS_CALIBRATION
from ampq.calibrate import MIN_EXPERT_TOKENS
from ampq.experts import experts_modules, is_router, projections
from ampq.models import replace_module
from ampq.pipeline.plans import Plan
from ampq.quant_experts import QuantExperts


@dataclass
class ExpertCounts:
    """What a run did with experts: matrices quantized, and those rounded to nearest for want of tokens."""
    matrices: int = 0
    fallback: int = 0

    def line(self) -> str | None:
        if not self.fallback:
            return None
        return (f"experts: {self.fallback} of {self.matrices} expert matrices got fewer than {MIN_EXPERT_TOKENS} "
                "calibration tokens from the router and were rounded to nearest (RTN); more calibration text "
                "reaches more of them")


def asked(name: str, spec) -> bool:
    """Whether ``spec`` names layer ``name`` itself: a plan's entry or a map's pattern other than ``*``."""
    if isinstance(spec, Plan):
        return name in spec.layers
    if isinstance(spec, Mapping):
        return any(p != "*" and fnmatch.fnmatchcase(name, p) for p in spec)
    return False


def keeps_router(block: nn.Module, prefix: str, sub: str, spec) -> bool:
    """Routers stay in 16 bits unless the spec names them."""
    return is_router(block, sub) and not asked(f"{prefix}.{sub}", spec)


def quantize_experts(prefix: str, block: nn.Module, choose: Callable, make: Callable, cal,
                     counts: ExpertCounts, observe: bool = False) -> None:
    """Every experts module of ``block``: ``choose(name)`` gives a projection's (format or None,
    algorithm, clip, options); ``make(name, weight, format, algorithm, stats, clip, options,
    observed)`` its QuantLinear, ``observed`` being the statistics of the tokens routed to that
    expert whatever the algorithm needs (with ``observe``; None where no token reached it). Projections are done in the order a token passes them, each measured after the one
    before it was quantized."""
    for sub, module in experts_modules(block).items():
        names = module.names if isinstance(module, QuantExperts) else projections(module)
        chosen = {p: choose(f"{prefix}.{sub}.{p}") for p in names}
        chosen = {p: c for p, c in chosen.items() if c[0] is not None}
        if not chosen:
            continue
        experts = module if isinstance(module, QuantExperts) else QuantExperts(module)
        replace_module(block, sub, experts)
        for projection, (fmt, algorithm, clip, options) in chosen.items():
            name = f"{prefix}.{sub}.{projection}"
            needs = algorithm in NEEDS_CALIBRATION or clip
            stats = cal.expert_stats(block, sub, projection) if (needs or observe) and cal is not None else {}
            layers = []
            for e in range(experts.num_experts):
                s = stats.get(e)
                short = needs and (s is None or s.count < MIN_EXPERT_TOKENS)
                counts.fallback += short
                layers.append(make(f"{name}.{e}", experts.expert_weight(projection, e), fmt,
                                   "rtn" if short else algorithm, None if short else s, clip and not short,
                                   None if short else options, s))
            counts.matrices += len(layers)
            experts.set_quantized(projection, layers)
