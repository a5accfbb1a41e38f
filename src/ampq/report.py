"""What a model costs: bytes and bits per weight, and the tables that show them."""

from __future__ import annotations

import sys

from torch import nn

from ampq.experts import is_router
from ampq.models import decoder_blocks
from ampq.nn import quantized_linears
from ampq.quant_experts import quantized_projections


def model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor a checkpoint of ``model`` stores (a tied head counted once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + [b for n, b in model.named_buffers() if _persistent(model, n)]:
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def _persistent(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf not in getattr(module, "_non_persistent_buffers_set", set())


def linear_bits(model: nn.Module, names: list[str] | None = None) -> float:
    """Average stored bits per weight over the linears ``names`` (default: every QuantLinear and
    quantized expert projection, or the decoder blocks' linears of an unquantized model), each in
    the bytes it actually stores."""
    quantized = quantized_linears(model)
    experts = quantized_projections(model)
    if names is None:
        names = list(quantized) + list(experts) or block_linear_names(model)
    bits = weights = 0
    for name in names:
        if name in experts:
            module, projection = experts[name]
            bits += 8 * module.nbytes(projection)
            weights += module.num_experts * module.shapes[projection][0] * module.shapes[projection][1]
            continue
        m = quantized.get(name) or model.get_submodule(name)
        if name in quantized:
            bits += 8 * m.nbytes()
            weights += m.in_features * m.out_features
        elif isinstance(m, nn.Linear):
            bits += 8 * m.weight.numel() * m.weight.element_size()
            weights += m.weight.numel()
    return bits / weights if weights else float("nan")


def block_linear_names(model: nn.Module) -> list[str]:
    names = []
    for prefix, block in decoder_blocks(model):
        quantized = quantized_linears(block)
        inside = tuple(f"{n}." for n in quantized)
        names += [f"{prefix}.{n}" for n, m in block.named_modules() if n in quantized or (
            isinstance(m, nn.Linear) and not n.startswith(inside) and not is_router(block, n))]
    return names


def print_table(title: str, columns: list[str], rows: list[list], note: str | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, caption=note, caption_justify="left")
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[_fmt(v) for v in r])
    Console(width=None if sys.stdout.isatty() else 160).print(table)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v != 0 and abs(v) < 1e-2:
            return f"{v:.2e}"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)

