"""AWQ (Lin et al. 2023): before quantizing, multiply the input channels of each group of linears
by s = mag^alpha (mag: mean |x| of the channel), so that the channels that carry large activations
lose less to rounding, and divide the op before by s so that the float block computes the same.

This only rescales; the pipeline quantizes the linears afterwards (with its own clip search).
"""

from __future__ import annotations

import torch
from torch import nn

from ampq.calibrate import Calibration, _Stop
from ampq.formats import get_format

# A group's first linear -> the ops that may absorb 1/s, tried in order: a norm whose output is the
# group's input, or a linear whose output channel j reaches only input channel j of the group
# (through an elementwise gate, or attention's weighted sum over v). Names that do not apply to an
# architecture are caught by the check on the block's output and fall back to an explicit scale.
PREVIOUS = {
    "self_attn.q_proj": ("input_layernorm",),  # Llama, Mistral, Qwen2/3, Gemma
    "mlp.gate_proj": ("pre_feedforward_layernorm", "post_attention_layernorm"),  # Gemma2/3 first
    "mlp.down_proj": ("mlp.up_proj",),
    "self_attn.o_proj": ("self_attn.v_proj",),  # only without grouped-query attention
    "attention.query_key_value": ("input_layernorm",),  # GPT-NeoX
    "mlp.dense_h_to_4h": ("post_attention_layernorm",),
}


def awq_block(block: nn.Module, calibration: Calibration, formats: dict[str, str], *,
              grid: int = 20, duo_scaling: bool | None = None, refine: int = 3) -> dict[str, float]:
    """Search and fold AWQ scales into ``block`` in place; returns {group: best alpha}.

    Each group's alphas are first ranked by the squared output error of its quantized linears over
    every calibration token, tr(E X^T X E^T) with E = Q(W s)/s - W, from X^T X without a forward
    pass. For a group that feeds a nonlinear module (q/k/v into attention, gate/up into the MLP)
    the best ``refine`` of them, and alpha = 0, are then run through that module on the first
    calibration batch, as AutoAWQ does for every grid point, and the one with the least module
    output error wins.
    ``duo_scaling`` (on in AutoAWQ and llm-compressor) divides s by the weights' relative
    magnitude per input channel to the power 1 - alpha; None (the default) tries both ways.
    """
    with torch.no_grad():
        ref0 = calibration._run(block, 0)  # folding keeps the block's function: one reference
        alphas = {}
        for group in calibration.groups(block):
            quantized = {name: formats[name] for name in group if name in formats}
            if not quantized:
                continue
            mag, xtx = _input_stats(block, calibration, group[0])
            ranked = _search(block, quantized, mag, xtx, grid, duo_scaling)
            alpha, s = ranked[0]
            parent = group[0].rpartition(".")[0]
            if refine and len(group) > 1 and parent:
                alpha, s = _refine(block, calibration, parent, quantized, ranked[:refine] + [_alpha_zero(ranked)])
            _apply(block, calibration, group, quantized, s, ref0)
            alphas[",".join(group)] = alpha
        return alphas


def scales(mag: torch.Tensor, alpha: float, wmag: torch.Tensor | None = None) -> torch.Tensor:
    # a floor relative to the largest channel keeps dead channels from getting s -> 0
    mag = torch.nan_to_num(mag.float()).clamp(min=float(mag.max().clamp(min=1e-12)) * 1e-5)
    s = mag.pow(alpha)
    if wmag is not None:
        s = s / wmag.clamp(min=1e-4).pow(1 - alpha)
    return s / (s.max() * s.min()).sqrt()


def _input_stats(block: nn.Module, calibration: Calibration, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |x| per input channel and X^T X of linear ``name``'s input, over every batch."""
    n = block.get_submodule(name).in_features
    total = torch.zeros(n, dtype=torch.float64, device=calibration.device)
    xtx = torch.zeros(n, n, device=calibration.device)
    count = 0

    def visit(x):
        nonlocal count
        x = x.reshape(-1, x.shape[-1]).float()
        total.add_(x.abs().sum(0, dtype=torch.float64))
        xtx.addmm_(x.t(), x)
        count += x.shape[0]

    calibration.visit_inputs(block, name, visit)
    return (total / count).float(), xtx / count


def _weight_magnitude(weights: list[torch.Tensor]) -> torch.Tensor:
    """Mean over output rows of |w| relative to its row's largest, per input channel."""
    w = torch.cat([w.float().abs() for w in weights])
    return (w / w.amax(1, keepdim=True).clamp(min=1e-12)).mean(0)


def _search(block, quantized, mag, xtx, grid, duo_scaling) -> list[tuple[float, torch.Tensor]]:
    """(alpha, s) for every grid point, best first by the linears' output error."""
    weights = {name: block.get_submodule(name).weight.detach().float() for name in quantized}
    duo = [True, False] if duo_scaling is None else [duo_scaling]
    scored = []
    for use_duo in duo:
        wmag = _weight_magnitude(list(weights.values())) if use_duo else None
        for k in range(0 if use_duo is duo[0] else 1, grid):  # k = 0 (s = 1) is plain RTN, once
            alpha = k / grid
            s = torch.ones_like(mag) if k == 0 else scales(mag, alpha, wmag)
            err = 0.0
            for name, w in weights.items():
                e = get_format(quantized[name]).fake_quantize(w * s) / s - w
                err += float(((e @ xtx) * e).sum(dtype=torch.float64))
            scored.append((err, k, alpha, s))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [(alpha, s) for _, _, alpha, s in scored]


def _alpha_zero(ranked):
    """Plain rounding (s = 1), always among the refined candidates so AWQ never does worse."""
    return next(r for r in ranked if r[0] == 0.0)


def _refine(block, calibration, parent, quantized, candidates):
    """The candidate whose quantized linears change ``parent``'s output least on the first batch."""
    module = block.get_submodule(parent)
    captured = {}

    def catch(mod, args, kwargs):
        captured.update(args=args, kwargs=kwargs)
        raise _Stop

    handle = module.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        calibration._run(block, 0)
    except _Stop:
        pass
    finally:
        handle.remove()
    if not captured:
        return candidates[0]

    def run():
        out = module(*captured["args"], **captured["kwargs"])
        return (out[0] if isinstance(out, tuple) else out).double()

    linears = {name: block.get_submodule(name) for name in quantized}
    original = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    ref = run()
    best, best_err = candidates[0], float("inf")
    try:
        seen = set()
        for alpha, s in candidates:
            # alpha = 0 may be among the best already; the same alpha with and without duo scaling
            # is two candidates (two different s), so a candidate is known by its s, not its alpha
            if id(s) in seen:
                continue
            seen.add(id(s))
            for name, lin in linears.items():
                w = original[name].float()
                lin.weight.copy_(get_format(quantized[name]).fake_quantize(w * s) / s)
            err = float((run() - ref).pow(2).sum())
            if err < best_err:
                best, best_err = (alpha, s), err
    finally:
        for name, lin in linears.items():
            lin.weight.copy_(original[name])
    return best


def _scale_(t: torch.Tensor, factor: torch.Tensor) -> None:
    t.copy_(t.float() * factor)


def _apply(block, calibration, group, quantized, s, ref0) -> str:
    """Fold ``s`` into the op before the group, or keep it explicit; returns where it went."""
    linears = [block.get_submodule(name) for name in group]
    x0 = calibration.inputs[0]
    tol = 1e-3 if ref0.dtype == torch.float32 else 5e-2
    for prev_name in PREVIOUS.get(group[0], ()):
        try:
            prev = block.get_submodule(prev_name)
        except AttributeError:
            continue
        weight = getattr(prev, "weight", None)
        if weight is None or weight.shape[0] != s.numel() or any(m is prev for m in linears):
            continue
        tensors = [t for t in (weight, getattr(prev, "bias", None), *(m.weight for m in linears))
                   if isinstance(t, torch.Tensor)]
        saved = [t.detach().clone() for t in tensors]
        if isinstance(prev, nn.Linear):
            _scale_(weight, 1 / s[:, None])
        else:  # Gemma's norms multiply by (1 + weight)
            offset = 1.0 if "Gemma" in type(prev).__name__ else 0.0
            weight.copy_((weight.float() + offset) / s - offset)
        if isinstance(getattr(prev, "bias", None), torch.Tensor):
            _scale_(prev.bias, 1 / s)
        for m in linears:  # every consumer of the op's output, quantized or not
            _scale_(m.weight, s)
        # a norm that also feeds other layers, or an op that is not channelwise, shows up here
        out = calibration._run(block, 0).double()
        if (out - ref0.double()).norm() <= tol * (ref0.double() - x0.double()).norm():
            return prev_name
        for t, old in zip(tensors, saved):
            t.copy_(old)
    # QuantLinear divides its input at run time; a hook does it for the float layer until then,
    # so that later groups and the calibration statistics see the right inputs
    divide = _divider()
    for name in quantized:
        m = block.get_submodule(name)
        _scale_(m.weight, s)
        old = getattr(m, "input_scale", None)
        if old is None:
            m.register_forward_pre_hook(divide)
        m.input_scale = (s if old is None else old * s).float()
    return "input_scale"


def _divider():
    last = {}

    def divide(module, args):
        # the group's layers get one tensor, as before, so Calibration.groups still sees one group
        x = args[0]
        if last.get("x") is not x or not torch.equal(last["scale"], module.input_scale):
            last.update(x=x, scale=module.input_scale, y=x / module.input_scale.to(x.dtype))
        return (last["y"], *args[1:])

    return divide
