"""llama.cpp (llama-cpp-python) as the tests drive it, and the activation rounding its CPU matmuls
apply, so that a tolerance can be measured rather than guessed."""

from __future__ import annotations

from unittest import mock

import numpy as np
import torch


def llama_cpp_logits(path, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) float32 logits llama.cpp computes for ``ids`` from the GGUF file ``path``.

    Loaded without llama.cpp's extra CPU buffer types (``use_extra_bufts``): those repack the same
    weights for AMX or wider SIMD, and the AMX path crashes on some virtual machines (this one);
    the plain path computes the same numbers from the file as written."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    n_ctx = max(64, len(ids))
    with mock.patch.object(low, "llama_model_default_params", params):
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(list(ids))
        return torch.tensor(np.asarray(llm.scores[:len(ids)], dtype=np.float32))
    finally:
        llm.close()


def _round_to_8_bits(x: torch.Tensor, block: int, signed_max: bool) -> torch.Tensor:
    """x as llama.cpp's activation blocks hold it: Q8_0 / Q8_1 (32 inputs, d = absmax / 127 kept in
    fp16) or Q8_K (256 inputs, d = -max / 127 by the value of largest magnitude, kept in float32)."""
    b = x.float().reshape(-1, block)
    if signed_max:
        peak = b.gather(1, b.abs().argmax(1, keepdim=True))
        iscale = torch.where(peak != 0, -127.0 / peak, torch.zeros_like(peak))
        d = torch.where(peak != 0, 1 / iscale, torch.zeros_like(peak))
        return (torch.round(iscale * b).clamp(max=127) * d).reshape(x.shape)
    d = b.abs().amax(1, keepdim=True) / 127
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    return (torch.round(b * inv) * d.half().float()).reshape(x.shape)


def activation_rounding(format_name: str):
    """What llama.cpp's CPU matmul does to the inputs of a layer of ``format_name`` (the type its
    weight type multiplies with: ``vec_dot_type`` in ggml-cpu)."""
    if format_name in ("bf16", "fp16"):
        dtype = torch.bfloat16 if format_name == "bf16" else torch.float16
        return lambda x: x.to(dtype).float()
    if format_name.endswith("_k") or format_name == "iq4_xs":
        return lambda x: _round_to_8_bits(x, 256, True)
    return lambda x: _round_to_8_bits(x, 32, False)
