"""Tiny random mixture-of-experts models, one per family transformers 5 has, built from each
family's own config class (two blocks, hidden size 64, four experts)."""

from __future__ import annotations

import torch

# family -> (config class, model class, config keywords beyond the shared small sizes)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[])),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, head_dim=16, mlp_only_layers=[])),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                    dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1,
                         first_k_dense_replace=0, n_group=1, topk_group=1, kv_lora_rank=32, q_lora_rank=32,
                         qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16, num_key_value_heads=4)),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM",
                dict(num_local_experts=4, num_experts_per_tok=2, head_dim=16,
                     layer_types=["full_attention", "sliding_attention"])),
    "llama4": ("Llama4TextConfig", "Llama4ForCausalLM",
               dict(num_local_experts=4, num_experts_per_tok=1, intermediate_size=64, intermediate_size_mlp=128,
                    head_dim=16, no_rope_layers=[1, 1], moe_layers=[0, 1], interleave_moe_layer_step=1)),
}


def tiny_moe(family: str, seed: int = 0, **overrides):
    """A small random model of ``family`` in float32, in eval mode; biases get random values too
    (transformers initializes gpt-oss's expert biases to zero, which would hide a wrong bias).
    ``overrides`` replace config keywords (sizes, vocabulary, routing)."""
    import transformers

    config_name, model_name, extra = FAMILIES[family]
    extra = dict(extra)
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=extra.pop("intermediate_size", 128),
                  num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128, num_key_value_heads=2,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_bias") and "experts" in name:
                p.normal_(0, 0.02)
    return model.requires_grad_(False)
