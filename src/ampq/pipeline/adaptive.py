"""Runtime adaptation: quantize once to nested storage, then move layers between the precisions
they store while the model runs, without reloading it.

    model = ampq.load("smollm2-adaptive")          # every stored level in memory
    ampq.adapt(model, budget=4.5)                  # re-solve the allocation, drop what does not fit
    ampq.adapt(model, max_size="120MB")            # or a size for the whole model

``adapt`` re-solves the same exact allocation as ``ampq quantize --budget`` over the levels each
layer stores, with the damage of each level measured when the checkpoint was made. Policies
(:class:`MemoryTarget`, :class:`QualityTarget`) call it between generation steps.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from ampq.allocate import allocate, reachable
from ampq.calibrate import MIN_EXPERT_TOKENS
from ampq.errors import AmpqError
from ampq.fisher import fisher_damage, output_fisher
from ampq.io.residuals import reading
from ampq.memory import available_memory, return_freed_memory
from ampq.nested import NestedLinear, nest, residual_formats
from ampq.nested_experts import NestedProjection, nested_projections
from ampq.nn import quantized_linears
from ampq.pipeline.blockwise import quantize_blocks
from ampq.pipeline.budget import parse_size
from ampq.pipeline.expert_damage import expert_projection_names
from ampq.pipeline.planner import tie_groups
from ampq.report import block_linear_names, model_bytes
from ampq.sensitivity import row_errors


def nested_layers(model: nn.Module) -> dict[str, NestedLinear | NestedProjection]:
    """Every unit that switches level by name: the adaptive linears, and the adaptive expert
    projections (all experts of one projection move together)."""
    layers: dict = {n: m for n, m in quantized_linears(model).items() if isinstance(m, NestedLinear)}
    layers.update(nested_projections(model))
    return layers


def quantize_adaptive(model: nn.Module, levels: list[int], calibration, *, base_format: str | None = None,
                      algorithm: str = "gptq", gradient_windows: int = 8, progress: bool = True, **kwargs) -> nn.Module:
    """Quantize ``model`` in place to nested storage: each linear of the decoder blocks gets a
    ``levels[0]``-bit base (``base_format``, default int{levels[0]}-g128, by ``algorithm``) plus one
    residual per further level, and each level's estimated damage (Fisher-weighted output error,
    as :mod:`ampq.sensitivity` measures it) for :func:`adapt`."""
    base_format = base_format or f"int{levels[0]}-g128"
    formats = residual_formats(levels, base_format)
    tokens = getattr(calibration, "tokens", calibration)
    if tokens is None:
        raise AmpqError("adaptive quantization needs calibration text to estimate each level's damage (CLI: --calib wiki)")
    names = block_linear_names(model) + expert_projection_names(model)
    resume = kwargs.get("resume")
    fisher = resume.tensors("fisher") if resume is not None else None  # a killed run's, when it got that far
    if fisher is None or set(fisher) != set(names):
        with torch.inference_mode(False):
            fisher = output_fisher(model, tokens[:gradient_windows].clone(), names, progress=progress,
                                   placement=kwargs.get("placement"))
        if resume is not None:
            resume.save_tensors("fisher", fisher)

    short = []  # expert matrices whose residuals were rounded to nearest for want of routed tokens

    def on_layer(name, linear, base, stats):
        # an expert's matrix comes as its (out, in) weight, named "<projection>.<expert>"
        weight = (linear.weight if isinstance(linear, nn.Module) else linear).detach().float()
        projection, _, expert = name.rpartition(".")
        f = fisher[name] if name in fisher else fisher[projection][int(expert)]
        # fitted on the routed tokens where there are enough; an expert no calibration token reached
        # adds nothing measurable to the KL (as sensitivity counts it)
        enough = stats is not None and (name in fisher or stats.count >= MIN_EXPERT_TOKENS)  # a linear sees every token
        short.extend([] if enough else [name])
        residuals = nest(base, weight, formats, stats if enough else None)
        damage, approx = [], base.dequantize(torch.float32)
        for k in range(len(residuals) + 1):
            if k:
                approx = approx + residuals[k - 1].dequantize(torch.float32)
            damage.append(fisher_damage(row_errors(weight, approx, stats.hessian), f) if stats is not None else 0.0)
        layer = NestedLinear(base, formats, residuals, damage)
        # later blocks are calibrated on the base's outputs, so the lowest level is exactly the
        # model quantized directly to the base format
        layer.set_level(0)
        return layer

    quantize_blocks(model, base_format, algorithm=algorithm, calibration=calibration, on_layer=on_layer,
             progress=progress, **kwargs)
    if progress and short:
        print(f"adaptive: the residuals of {len(short)} expert matrices were rounded to nearest (RTN): fewer than "
              f"{MIN_EXPERT_TOKENS} calibration tokens were routed to them; more calibration text reaches more",
              file=sys.stderr)
    for layer in nested_layers(model).values():
        layer.set_level(layer.levels - 1)
    return model


def level_table(model: nn.Module) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, int]]]:
    """(damage, bytes) of every stored level of every nested layer, keyed "L0", "L1", ..."""
    layers = nested_layers(model)
    if not layers:
        raise AmpqError("this model has no adaptive layers; quantize it with --adaptive LOW:HIGH (or "
                        "ampq.pipeline.adaptive.quantize_adaptive) to switch precisions at run time")
    damage, nbytes = {}, {}
    for name, m in layers.items():
        if m.damage is None:
            raise AmpqError(f"layer {name} carries no damage estimates; re-create the adaptive checkpoint")
        damage[name] = {f"L{k}": float(m.damage[k]) for k in range(m.levels)}
        nbytes[name] = {f"L{k}": m.level_bytes(k) for k in range(m.levels)}
    return damage, nbytes


def stored_range(model: nn.Module) -> tuple[float, float]:
    """Bits per weight of the lowest and the highest plan this model can switch to."""
    _, nbytes = level_table(model)
    lo, hi = reachable(nbytes, tie_groups(list(nbytes)))
    weights = sum(m.numel for m in nested_layers(model).values())
    return 8 * lo / weights, 8 * hi / weights


@dataclass
class Switch:
    levels: dict[str, int]  # layer -> level now
    changed: int  # layers switched
    bytes_before: int  # bytes of the nested layers before and after
    bytes_after: int
    predicted_damage: float  # sum of the chosen levels' estimates
    seconds: float


def plan_levels(model: nn.Module, *, budget: float | None = None, max_size: int | str | None = None,
                linear_bytes: int | None = None, tied: bool = True) -> tuple[dict[str, int], float]:
    """The levels of least estimated damage that fit ``budget`` (bits per weight over the adaptive
    linears), ``max_size`` (bytes of the whole model) or ``linear_bytes`` (bytes of the adaptive
    linears), and their damage."""
    if sum(b is not None for b in (budget, max_size, linear_bytes)) != 1:
        raise AmpqError("give exactly one budget to adapt to: bits per weight (budget=4.5) or a size (max_size='120MB')")
    damage, nbytes = level_table(model)
    layers = nested_layers(model)
    weights = sum(m.numel for m in layers.values())
    groups = tie_groups(list(damage)) if tied else []
    fixed = model_bytes(model) - sum(m.nbytes() for m in layers.values())
    if linear_bytes is not None:
        cap = linear_bytes
    else:
        # the small slack lets a budget printed from stored_range() round-trip through floats
        cap = int(budget * weights / 8 + 1e-6) if budget is not None else parse_size(max_size) - fixed
    try:
        result = allocate(damage, nbytes, cap, groups)
    except AmpqError:
        lo, hi = reachable(nbytes, groups)
        if max_size is None:
            raise AmpqError(f"budget {budget if budget is not None else 8 * cap / weights:.4g} bits per weight is outside what this model stores: "
                            f"{8 * lo / weights:.3f} to {8 * hi / weights:.3f} bits per weight") from None
        raise AmpqError(f"max_size {parse_size(max_size):,} bytes is outside what this model stores: "
                        f"{(lo + fixed) / 1e6:.1f} MB to {(hi + fixed) / 1e6:.1f} MB") from None
    return {n: int(c[1:]) for n, c in result.choice.items()}, result.damage


def adapt(model: nn.Module, budget: float | None = None, *, max_size: int | str | None = None,
          levels: dict[str, int] | None = None, tied: bool = True) -> Switch:
    """Switch the model's adaptive layers to the allocation of least estimated damage within the
    budget (or to explicit ``levels``). Dropped refinements are freed; missing ones are read back
    from the checkpoint by memory map (or from host memory), never by reloading the model."""
    t0 = time.perf_counter()
    layers = nested_layers(model)
    before = sum(m.nbytes() for m in layers.values())
    if levels is None:
        levels, predicted = plan_levels(model, budget=budget, max_size=max_size, tied=tied)
    else:
        unknown = sorted(set(levels) - set(layers))
        if unknown:
            raise AmpqError(f"adapt: {unknown[0]} is not an adaptive layer of this model")
        predicted = sum(layers[n].damage[k] for n, k in levels.items() if layers[n].damage)
    changed = 0
    lowered = False
    with reading():
        for name, level in levels.items():
            m = layers[name]
            if m.level != level:
                lowered |= level < m.level
                m.set_level(level)
                changed += 1
    if lowered:
        return_freed_memory()
    return Switch({n: m.level for n, m in layers.items()}, changed, before,
                  sum(m.nbytes() for m in layers.values()), float(predicted), time.perf_counter() - t0)


class MemoryTarget:
    """Keep the model within ``max_bytes`` (whole model) and within the memory actually free,
    less ``reserve``: called between generation steps, it switches down when memory runs short
    and back up when it is free again (by at least ``hysteresis`` bytes, so it does not flap).
    On a GPU it reads the device's free memory instead of the host's."""

    def __init__(self, max_bytes: int | str | None = None, reserve: int | str = "256MB",
                 hysteresis: int | str = "8MB", free_memory=None):
        self.max_bytes = parse_size(max_bytes) if max_bytes is not None else None
        self.reserve, self.hysteresis = parse_size(reserve), parse_size(hysteresis)
        self.free_memory = free_memory

    def _free(self, model: nn.Module) -> int | None:
        if self.free_memory is not None:
            return self.free_memory()
        device = next(model.parameters()).device
        if device.type == "cuda":
            return torch.cuda.mem_get_info(device)[0]
        return available_memory()[0]

    def target(self, model: nn.Module) -> int:
        now = model_bytes(model)
        limits = [self.max_bytes] if self.max_bytes is not None else []
        free = self._free(model)
        if free is not None:
            limits.append(now + free - self.reserve)
        if not limits:
            raise AmpqError("MemoryTarget needs max_bytes where free memory cannot be read")
        return min(limits)

    def __call__(self, model: nn.Module) -> Switch | None:
        """Switch when the model is over its target, or when a better plan fits with room to spare."""
        now, goal = model_bytes(model), self.target(model)
        if now <= goal < now + self.hysteresis:
            return None
        try:
            levels, _ = plan_levels(model, max_size=goal)
        except AmpqError:  # below the lowest stored plan: the lowest it is
            levels = {n: 0 for n in nested_layers(model)}
        if all(nested_layers(model)[n].level == k for n, k in levels.items()):
            return None
        return adapt(model, levels=levels)


class QualityTarget:
    """The smallest stored plan whose estimated damage (KL, nats per token, with the Fisher
    estimator) is at most ``max_damage``: per request, a quality bar instead of a size."""

    def __init__(self, max_damage: float):
        self.max_damage = float(max_damage)

    def levels(self, model: nn.Module) -> dict[str, int]:
        _, nbytes = level_table(model)
        lo, hi = reachable(nbytes, tie_groups(list(nbytes)))
        best, damage = plan_levels(model, linear_bytes=lo)
        if damage <= self.max_damage:
            return best
        best, _ = plan_levels(model, linear_bytes=hi)
        # damage falls as bytes grow: bisect on the byte budget for the smallest that meets the bar
        while hi - lo > max(1, hi // 2000):
            mid = (lo + hi) // 2
            levels, damage = plan_levels(model, linear_bytes=mid)
            if damage <= self.max_damage:
                hi, best = mid, levels
            else:
                lo = mid
        return best

    def __call__(self, model: nn.Module) -> Switch | None:
        levels = self.levels(model)
        if all(nested_layers(model)[n].level == k for n, k in levels.items()):
            return None
        return adapt(model, levels=levels)
