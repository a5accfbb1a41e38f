"""What the readers of others' layouts share: building QuantLinears from codes and checking that
a parameter survives ampq's storage dtype."""

from __future__ import annotations

import torch

from ampq.formats import Params, get_format
from ampq.nn import QuantLinear


class Notes(list):
    """One line per inexact conversion, printed by the loader (empty when the import is exact)."""


def as_dtype(t: torch.Tensor, dtype: torch.dtype, what: str, notes: Notes) -> torch.Tensor:
    """``t`` in ``dtype``; where that changes a value, a note with the largest relative change."""
    out = t.to(dtype)
    back = out.to(t.dtype)
    if not torch.equal(back, t):
        diff = ((back.float() - t.float()).abs() / t.float().abs().clamp(min=1e-30)).max().item()
        notes.append(f"{what}: {t.dtype} -> {dtype} changed values by up to {diff:.2e} relative")
    return out


def quant_linear(linear, format_name: str, codes: torch.Tensor, stored_params: dict[str, torch.Tensor],
                 bias: torch.Tensor | None, algorithm: str, **kwargs) -> QuantLinear:
    """A QuantLinear of ``format_name`` holding ``codes`` ((out, in), unsigned) and the parameters as
    that format stores them (fp16 ``scale``, uint8 ``zero``, ...)."""
    fmt = get_format(format_name)
    shape = (linear.out_features, linear.in_features)
    if tuple(codes.shape) != shape:
        raise ValueError(f"codes of shape {tuple(codes.shape)} for a {shape[0]}x{shape[1]} linear")
    if int(codes.min()) < 0 or int(codes.max()) >= 1 << fmt.bits:
        raise ValueError(f"codes outside 0..{(1 << fmt.bits) - 1}")
    params = fmt.load_params(stored_params, shape)
    stored = fmt.pack(codes, Params(params.values, stored_params))
    expected = fmt.nbytes(shape)
    held = sum(t.numel() * t.element_size() for t in stored.values())
    if held != expected:
        raise ValueError(f"{format_name} needs {expected} bytes for {shape[0]}x{shape[1]}; the parameters make {held}")
    return QuantLinear(linear.in_features, linear.out_features, format_name, stored, bias, algorithm, **kwargs)


def group_name(group: int, in_features: int) -> str:
    """ampq's granularity suffix for a group of ``group`` inputs (-1 or the whole row: per channel)."""
    return "ch" if group in (-1, 0) or group >= in_features else f"g{group}"


def act_order(g_idx: torch.Tensor | None, group: int, in_features: int) -> torch.Tensor | None:
    """None where ``g_idx`` (the group of each input) is input // group; otherwise (act-order, GPTQ's
    desc_act) the permutation that lists each group's inputs together, for QuantLinear's input_perm."""
    consecutive = torch.arange(in_features) // group
    if g_idx is None or torch.equal(g_idx.long(), consecutive):
        return None
    if g_idx.shape != (in_features,):
        raise ValueError(f"g_idx of shape {tuple(g_idx.shape)} for {in_features} inputs")
    perm = torch.argsort(g_idx.long(), stable=True)
    if not torch.equal(g_idx.long()[perm], consecutive):
        raise ValueError(f"g_idx does not put {group} inputs in each group")
    return perm
