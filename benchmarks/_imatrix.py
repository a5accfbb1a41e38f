"""An importance matrix for llama.cpp's quantizer, from the calibration text ampq calibrates on.

llama.cpp's `llama-imatrix` records, for every weight matrix, the mean over calibration tokens of the
square of each input; `llama-quantize --imatrix` then weights each weight's rounding error by it
(what ampq's K-quant encoders do with their own calibration). llama-cpp-python 0.3.36 passes it to
`llama_model_quantize` as an array of (tensor name, values) entries, which ctypes builds here. The
statistics are gathered on the float model over the same windows `ampq quantize` calibrates on
(the `mix` text, as many windows as ampq gives the model), so both quantizers see the same data.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn
from transformers import AutoConfig

import ampq
from ampq.data import Text, sized_for, windows_of
from ampq.exporters.gguf import architectures
from ampq.models import decoder_blocks


@torch.no_grad()
def importance(model_name: str, checkpoint: Path, calib: str = "mix") -> dict[str, np.ndarray]:
    """GGUF tensor name -> the mean of x^2 per input over the calibration tokens, for every linear
    of the decoder blocks of ``model_name`` (named as ``checkpoint``'s GGUF export names them)."""
    model, tok = ampq.load_model(model_name)
    windows = windows_of(sized_for(Text(calib), model), tok, "calib")
    spec = architectures.check(checkpoint, AutoConfig.from_pretrained(checkpoint), [])
    names = gguf.get_tensor_name_map(spec.arch, model.config.num_hidden_layers)
    inside = tuple(f"{prefix}." for prefix, _ in decoder_blocks(model))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def record(name):
        def hook(_, args):
            x = args[0].detach().float().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return hook

    hooks = [m.register_forward_pre_hook(record(n)) for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n.startswith(inside)]
    try:
        for i in range(0, len(windows.tokens), 4):
            model(windows.tokens[i:i + 4])
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for name, total in sums.items():
        mapped = names.get_name(name)
        if mapped is None:
            raise RuntimeError(f"{name} has no llama.cpp name in the {spec.name} architecture")
        out[f"{mapped}.weight"] = (total / counts[name]).numpy().astype(np.float32)
    return out


def as_ctypes(matrix: dict[str, np.ndarray]):
    """The NULL-terminated array of llama_model_imatrix_data that ``llama_model_quantize_params.imatrix``
    points to, and what must stay alive while llama.cpp reads it."""
    import llama_cpp

    entries = (llama_cpp.llama_model_imatrix_data * (len(matrix) + 1))()
    keep = []
    for i, (name, values) in enumerate(matrix.items()):
        values = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [values, encoded]
        entries[i].name = encoded
        entries[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = values.size
    entries[len(matrix)].name = None
    return entries, keep
