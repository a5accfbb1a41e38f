"""compressed-tensors checkpoints, as llm-compressor writes them for vLLM (``quant_method:
compressed-tensors``).

Per linear, by the tensors stored (the config groups say which activations go with them):

- ``pack-quantized``: ``weight_packed`` int32 (out, in * bits / 32), signed codes + 2^(bits-1) packed
  along the inputs as one little-endian bitstream; ``weight_scale`` (out, groups) or (out, 1);
  ``weight_zero_point`` (asymmetric only: signed, packed the same way along the outputs).
- ``int-quantized`` / ``naive-quantized``: ``weight`` int8 (out, in) signed, ``weight_scale``.
- ``float-quantized``: ``weight`` float8_e4m3fn, ``weight_scale`` per channel or per tensor.
- ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized``: ``weight_packed`` uint8 (out, in / 2), two E2M1
  codes a byte, low nibble first; ``weight_scale`` float8_e4m3fn (out, in / 16) plus a float32
  ``weight_global_scale`` (NVFP4), or uint8 E8M0 exponents (out, in / 32) (MXFP4): ampq's ``nvfp4`` /
  ``mxfp4``, which store the same bytes.

w = scale * (q - zero_point) for integers, which is ampq's ``intK-gN-sym`` (no zero point) or
``intK-gN-zp``; fp8 is ``fp8-e4m3-ch`` / ``fp8-e4m3`` with the same codes, and dynamic per-token fp8
activations become ``fp8-e4m3-token``. ampq keeps integer scales in fp16 and fp8 channel scales in
bf16: where a checkpoint's scales are another dtype the conversion says how much they moved.
"""

from __future__ import annotations

import re

import torch

from ampq.formats.microscaled import E4M3, KINDS
from ampq.formats.packing import unpack_bits
from ampq.importers.common import Notes, act_order, as_dtype, group_name, quant_linear
from ampq.importers.packing import unpack_int32

QUANT_METHOD = "compressed-tensors"


def _matches(name: str, linear, targets) -> bool:
    """compressed-tensors' target rules: "re:PATTERN" (re.match on the module name), a module
    class name ("Linear"), or the module name itself."""
    for target in targets or ():
        if target.startswith("re:"):
            if re.match(target[3:], name):
                return True
        elif target in (type(linear).__name__, "Linear", name):
            return True
    return False


def _scheme(name: str, linear, qconfig: dict) -> dict | None:
    if _matches(name, linear, qconfig.get("ignore")):
        return None
    for group in (qconfig.get("config_groups") or {}).values():
        if isinstance(group, dict) and _matches(name, linear, group.get("targets")):
            return group
    return None


def _activation(name: str, scheme: dict | None, weight_format: str, notes: Notes) -> str | None:
    acts = (scheme or {}).get("input_activations")
    if not acts:
        return None
    if (acts.get("type") == "float" and acts.get("num_bits") == 8 and acts.get("dynamic") in (True, "true")
            and acts.get("strategy") == "token" and weight_format.startswith("fp8-e4m3")):
        return "fp8-e4m3-token"
    notes.append(f"{name}: input activations {acts.get('type')}{acts.get('num_bits')} "
                 f"{acts.get('strategy')} ({'dynamic' if acts.get('dynamic') else 'static'}) have no ampq "
                 "kernel here; the layer runs weight-only")
    return None


def _fp4(prefix: str, linear, packed, scale, glob, bias, scheme, notes: Notes):
    """A microscaled FP4 layer: ``nvfp4`` where there is a global scale, else ``mxfp4``."""
    out_f, in_f = linear.out_features, linear.in_features
    kind = "nvfp4" if glob is not None else "mxfp4"
    if packed.shape != (out_f, in_f // 2) or scale.shape != (out_f, in_f // KINDS[kind]):
        raise ValueError(f"{kind} weight_packed {tuple(packed.shape)} and weight_scale {tuple(scale.shape)} for a "
                         f"{out_f}x{in_f} linear (ampq reads groups of {KINDS[kind]} that divide the inputs)")
    codes = unpack_bits(packed.reshape(-1), 4, out_f * in_f).reshape(out_f, in_f)
    if kind == "mxfp4":
        stored = {"scale": scale.to(torch.uint8).contiguous()}
    else:
        if scale.dtype != torch.float8_e4m3fn:
            as_dtype(scale.float(), torch.float8_e4m3fn, f"{prefix} weight_scale", notes)
        code = E4M3.encode(scale.float()).to(torch.uint8)
        stored = {"scale": code.contiguous(), "global_scale": as_dtype(glob.reshape(-1)[:1], torch.float32,
                                                                      f"{prefix} weight_global_scale", notes)}
    return quant_linear(linear, kind, codes, stored, bias, "compressed-tensors",
                        activation=_activation(prefix, scheme, kind, notes))


def convert(prefix: str, take, qconfig: dict, linear, notes: Notes):
    out_f, in_f = linear.out_features, linear.in_features
    packed, weight = take("weight_packed"), None
    if packed is None:
        weight = take("weight")
        if weight is None:
            return None
    scale, zero, bias = take("weight_scale"), take("weight_zero_point"), take("bias")
    take("weight_shape")
    g_idx = take("weight_g_idx")
    glob = take("weight_global_scale")
    if scale is None:
        raise ValueError("quantized weights without weight_scale")
    scheme = _scheme(prefix, linear, qconfig)
    if packed is not None and packed.dtype == torch.uint8:
        return _fp4(prefix, linear, packed, scale, glob, bias, scheme, notes)
    scale = scale.reshape(scale.shape[0], -1) if scale.numel() > 1 else scale.reshape(1, 1)
    if weight is not None and weight.dtype == torch.float8_e4m3fn:
        per_tensor = scale.numel() == 1
        if not per_tensor and scale.shape != (out_f, 1):
            raise ValueError(f"fp8 weight_scale of shape {tuple(scale.shape)}: ampq reads per-tensor and "
                             "per-channel fp8 (not block or group scales)")
        fmt = "fp8-e4m3" if per_tensor else "fp8-e4m3-ch"
        dtype = torch.float32 if per_tensor else torch.bfloat16
        codes = weight.view(torch.uint8).to(torch.int32)
        stored = {"scale": as_dtype(scale, dtype, f"{prefix} weight_scale", notes)}
        return quant_linear(linear, fmt, codes, stored, bias, "compressed-tensors",
                            activation=_activation(prefix, scheme, fmt, notes))
    if packed is not None:
        bits = int(((scheme or {}).get("weights") or {}).get("num_bits") or 32 * packed.shape[1] // in_f)
        if bits not in (2, 4, 8):
            raise ValueError(f"{bits}-bit pack-quantized codes (ampq reads 2, 4 and 8; others changed "
                             "packing between compressed-tensors versions)")
        codes = unpack_int32(packed, bits, in_f, dim=1)
    elif weight.dtype == torch.int8:
        bits, codes = 8, weight.to(torch.int32) + 128
    else:
        raise ValueError(f"a {weight.dtype} weight that is neither int8 nor float8_e4m3fn")
    half = 1 << (bits - 1)
    if scale.numel() == 1:  # per tensor: the same scale on every row is ampq's per-channel format
        scale = scale.expand(out_f, 1)
    n_groups = scale.shape[1]
    group = -(-in_f // n_groups)
    if scale.shape[0] != out_f or -(-in_f // group) != n_groups:
        raise ValueError(f"weight_scale of shape {tuple(scale.shape)} for a {out_f}x{in_f} linear")
    perm = act_order(g_idx, group, in_f)  # actorder "group": stored in order, grouped by g_idx
    if perm is not None:
        codes = codes[:, perm].contiguous()
    gran = group_name(group, in_f)
    params = {"scale": as_dtype(scale.contiguous(), torch.float16, f"{prefix} weight_scale", notes)}
    if zero is not None:
        if zero.dtype == torch.int32 and zero.shape[0] != out_f:
            zero = unpack_int32(zero, bits, out_f, dim=0)
        else:
            zero = zero.to(torch.int32) + half
        zero = zero.reshape(out_f, -1).expand(out_f, n_groups)
    if zero is None or bool((zero == half).all()):
        return quant_linear(linear, f"int{bits}-{gran}-sym", codes, params, bias, "compressed-tensors",
                            activation=_activation(prefix, scheme, "int", notes), input_perm=perm)
    params["zero"] = zero.to(torch.uint8).contiguous()
    return quant_linear(linear, f"int{bits}-{gran}-zp", codes, params, bias, "compressed-tensors",
                        activation=_activation(prefix, scheme, "int", notes), input_perm=perm)
