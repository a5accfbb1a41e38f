"""AWQ (Lin et al. 2023): before quantizing, multiply the input channels of each group of linears
by s = mag^alpha (mag: mean |x| of the channel), so that the channels that carry large activations
lose less to rounding, and divide the op before by s so that the float block computes the same.

This only rescales; the pipeline quantizes the linears afterwards (with its own clip search).
"""

from __future__ import annotations

import torch
from torch import nn

from ampq.calibrate import Calibration
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
              grid: int = 20, max_batches: int | None = None) -> dict[str, float]:
    """Search and fold AWQ scales into ``block`` in place; returns {group: best alpha}."""
    with torch.no_grad():
        n = len(calibration.inputs) if max_batches is None else max(1, min(max_batches, len(calibration.inputs)))
        # folding keeps the block's function, so one reference serves every group
        ref = [calibration._run(block, i) for i in range(n)]
        alphas = {}
        for group in calibration.groups(block):
            quantized = {name: formats[name] for name in group if name in formats}
            if not quantized:
                continue
            mag = _magnitude(block, calibration, group[0])
            alpha, s = _search(block, calibration, quantized, mag, ref, grid)
            _apply(block, calibration, group, quantized, s, ref[0])
            alphas[",".join(group)] = alpha
        return alphas


def scales(mag: torch.Tensor, alpha: float) -> torch.Tensor:
    # a floor relative to the largest channel keeps dead channels from getting s -> 0
    mag = torch.nan_to_num(mag.float()).clamp(min=float(mag.max().clamp(min=1e-12)) * 1e-5)
    s = mag.pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def _magnitude(block: nn.Module, calibration: Calibration, name: str) -> torch.Tensor:
    total = torch.zeros(block.get_submodule(name).in_features, dtype=torch.float64, device=calibration.device)
    count = 0

    def visit(x):
        nonlocal count
        x = x.reshape(-1, x.shape[-1])
        total.add_(x.abs().sum(0, dtype=torch.float64))
        count += x.shape[0]

    calibration.visit_inputs(block, name, visit)
    return (total / count).float()


def _search(block, calibration, quantized, mag, ref, grid):
    linears = {name: block.get_submodule(name) for name in quantized}
    original = {name: lin.weight.detach().clone() for name, lin in linears.items()}
    best = (float("inf"), 0.0, torch.ones_like(mag))
    try:
        for k in range(grid):  # k = 0 (s = 1) is plain RTN, so AWQ never does worse on this data
            alpha = k / grid
            s = scales(mag, alpha)
            for name, lin in linears.items():
                w = original[name].float()
                lin.weight.copy_(get_format(quantized[name]).fake_quantize(w * s) / s)
            err = sum(float((calibration._run(block, i).double() - r.double()).pow(2).sum())
                      for i, r in enumerate(ref))
            if err < best[0]:
                best = (err, alpha, s)
    finally:
        for name, lin in linears.items():
            lin.weight.copy_(original[name])
    return best[1], best[2]


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
