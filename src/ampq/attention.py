"""Grouped-query attention without copying the KV cache: transformers' SDPA attention, except
that a decoding step (one query position) hands torch's ``scaled_dot_product_attention`` the key
and value heads as they are (``enable_gqa``) instead of repeated to the query heads' number.

transformers repeats them (a copy of the whole cache, every layer, every step) whenever the step is
traced by torch.compile and a mask is given, which a static KV cache always gives: at a few hundred
positions of context the copies cost more than the attention itself (benchmarks/bench.py shows the
decode rate falling with the prompt's length). The products are the same; only the copies go.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

NAME = "ampq_sdpa"


def gqa_sdpa_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                     is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: (batch, positions, heads, head size) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    groups = getattr(module, "num_key_value_groups", 1)
    if groups == 1 or query.shape[2] != 1 or key.shape[-1] != value.shape[-1] \
            or kwargs.get("softcap") is not None or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


def use_gqa_attention(model: nn.Module) -> bool:
    """Run ``model``'s attention through :func:`gqa_sdpa_forward` where it runs transformers' SDPA
    attention (the same figures); whether it does now."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    if getattr(model.config, "_attn_implementation", None) == NAME:
        return True
    if getattr(model.config, "_attn_implementation", None) != "sdpa" or not hasattr(model, "set_attn_implementation"):
        return False
    AttentionInterface.register(NAME, gqa_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    model.set_attn_implementation(NAME)
    return True
