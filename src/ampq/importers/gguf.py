"""GGUF files with their quantized layers kept quantized.

transformers' GGUF loader builds the model, its config and tokenizer, dequantizing every tensor
with gguf-py. Each decoder linear stored in a GGUF type that an ampq format holds exactly is then
replaced by a QuantLinear made of the file's own codes and fp16 scales, so ``ampq bench`` and
``ampq generate`` run it quantized, with the memory it takes in llama.cpp:

=========  =================  =============================================
GGUF type  ampq format        block (32 inputs)
=========  =================  =============================================
Q4_0       ``int4-g32-sym``   d (fp16), 16 bytes of nibbles: w = d * (q - 8)
Q4_1       ``int4-g32``       d, m (fp16), nibbles: w = d * q + m
Q5_0       ``int5-g32-sym``   d, 4 bytes of 5th bits, nibbles: w = d * (q - 16)
Q5_1       ``int5-g32``       d, m, 5th bits, nibbles: w = d * q + m
Q8_0       ``int8-g32-sym``   d, 32 int8: w = d * q
Q2_K..Q6_K ``q2_k``..``q6_k``  llama.cpp's blocks of 256, kept as they are
IQ4_NL/XS  ``iq4_nl``/``_xs``  the same (blocks of 32 / 256)
=========  =================  =============================================

Every replaced layer is checked: its decoded weight must equal transformers' dequantized one bit
for bit, or the layer stays as transformers loaded it. Other types (IQ1-IQ3, TQ, MXFP4) stay dequantized.
llama.cpp's q/k row order for the llama architecture is undone row by row (exact).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ampq.formats import GGUF_TYPES
from ampq.importers.common import quant_linear
from ampq.models import decoder_blocks, replace_module
from ampq.nn import QuantLinear

BLOCK = 32
# type name -> (ampq format, bytes of fp16 parameters, has minimum, bits)
TYPES = {"Q4_0": ("int4-g32-sym", 2, False, 4), "Q4_1": ("int4-g32", 4, True, 4),
         "Q5_0": ("int5-g32-sym", 2, False, 5), "Q5_1": ("int5-g32", 4, True, 5),
         "Q8_0": ("int8-g32-sym", 2, False, 8)}


def _decode_blocks(raw: np.ndarray, type_name: str, out: int, cols: int):
    """(codes (out, cols) unsigned, scale (out, blocks) fp16, min or None) from a tensor's blocks."""
    fmt, head, has_min, bits = TYPES[type_name]
    nb = cols // BLOCK
    blocks = torch.from_numpy(raw.reshape(out, nb, -1).copy())
    scale = blocks[..., 0:2].contiguous().view(torch.float16).reshape(out, nb)
    minimum = blocks[..., 2:4].contiguous().view(torch.float16).reshape(out, nb) if has_min else None
    body = blocks[..., head:]
    if bits == 8:
        codes = body.view(torch.int8).to(torch.int32) + 128
    else:
        qh = None
        if bits == 5:
            qh, body = body[..., :4].to(torch.int64), body[..., 4:]
            word = (qh << (8 * torch.arange(4))).sum(-1, keepdim=True)
            qh = ((word >> torch.arange(BLOCK)) & 1).to(torch.int32)
        lo, hi = (body & 0xF).to(torch.int32), (body >> 4).to(torch.int32)
        codes = torch.cat([lo, hi], dim=-1)
        if qh is not None:
            codes = codes | (qh << 4)
    return codes.reshape(out, cols), scale, minimum


def _row_order(rows: int, n_head: int) -> torch.Tensor:
    """For each row of transformers' llama q/k weight, the GGUF row that holds it (the inverse of
    llama.cpp's converter permutation: each head's rotary halves were interleaved)."""
    return torch.arange(rows).reshape(n_head, rows // n_head // 2, 2).swapaxes(1, 2).reshape(rows)


def keep_quantized(model: nn.Module, path: str | Path) -> list[str]:
    """Replace ``model``'s decoder linears (loaded from the GGUF file ``path`` by transformers) with
    QuantLinears holding the file's blocks where a format holds them exactly; returns notes."""
    import gguf  # here: gguf-py (and what it imports) stays out of ``import ampq``

    reader = gguf.GGUFReader(str(path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    arch_enum = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch), None)
    blocks = decoder_blocks(model)
    if arch_enum is None:
        return [f"{path}: architecture {arch!r} unknown to gguf-py; every layer stays dequantized"]
    name_map = gguf.get_tensor_name_map(arch_enum, len(blocks))
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    kept, mismatched, other = 0, [], {}
    prefixes = tuple(f"{p}." for p, _ in blocks)
    for name, linear in list(model.named_modules()):
        if not (isinstance(linear, nn.Linear) and name.startswith(prefixes)):
            continue
        mapped = name_map.get_type_and_name(f"{name}.weight", try_suffixes=(".weight",))
        t = tensors.get(mapped[1]) if mapped else None
        kind = t.tensor_type.name if t is not None else None
        block_type = kind is not None and kind.lower() in GGUF_TYPES
        if kind not in TYPES and not block_type:
            if kind not in (None, "F32", "F16", "BF16"):  # float layers were never quantized
                other[kind] = other.get(kind, 0) + 1
            continue
        out, cols = linear.out_features, linear.in_features
        leaf = name.rpartition(".")[2]
        order = None
        if arch == "llama" and leaf in ("q_proj", "k_proj"):
            order = _row_order(out, heads if leaf == "q_proj" else kv_heads)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        if block_type:  # ampq stores llama.cpp's blocks as they are: whole rows move
            blocks = torch.from_numpy(np.asarray(t.data).reshape(out, -1).copy())
            blocks = blocks[order] if order is not None else blocks
            layer = QuantLinear(cols, out, kind.lower(), {"blocks": blocks.contiguous()}, bias, f"gguf-{kind.lower()}")
        else:
            codes, scale, minimum = _decode_blocks(np.asarray(t.data), kind, out, cols)
            if order is not None:
                codes, scale = codes[order], scale[order]
                minimum = minimum[order] if minimum is not None else None
            params = {"scale": scale} if minimum is None else {"scale": scale, "min": minimum}
            layer = quant_linear(linear, TYPES[kind][0], codes, params, bias, f"gguf-{kind.lower()}")
        if not torch.equal(layer.dequantize(torch.float32).to(linear.weight.dtype), linear.weight.detach()):
            mismatched.append(name)
            continue
        replace_module(model, name, layer)
        kept += 1
    notes = []
    if other:
        notes.append(f"{Path(path).name}: {sum(other.values())} layers stay "
                     f"dequantized (types {', '.join(sorted(str(k) for k in other))} have no exact ampq format)")
    if mismatched:
        notes.append(f"{len(mismatched)} layers did not decode as transformers decoded them and stay dequantized "
                     f"(first: {mismatched[0]})")
    return notes
