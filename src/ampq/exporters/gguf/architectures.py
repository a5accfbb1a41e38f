"""Which llama.cpp architecture a transformers model becomes, and what its converter
(``convert_hf_to_gguf.py``: ``LlamaModel``, ``Qwen2Model``, ``Gemma2Model``, ``Gemma3Model``,
``Phi3MiniModel``) writes beyond tensor names and the keys every architecture shares.

Names come from gguf-py's tables for the architecture, so Phi-3's fused ``qkv_proj`` and
``gate_up_proj`` are written as the single ``attn_qkv`` and ``ffn_up`` tensors llama.cpp splits
itself. What the converter changes in tensors is here as data: llama's q/k row permutation, and
Gemma's norms, which transformers applies as ``x * (1 + w)`` and llama.cpp as ``x * w``, so they are
written plus one.

llama.cpp fixes some things the transformers configs leave free: Gemma 2 alternates sliding and
global layers (every 2nd global), Gemma 3 makes every 6th layer global with a local rotary base of
10000, both scale attention by 1/sqrt(head_dim) (by 1/sqrt(hidden/heads) for their 27B sizes), and
Phi-3 attends to the whole context. A config that differs is refused (or, for Phi-3's and Mistral's
windows, warned about), never written to compute something else.

BERT encoders (``BertModel``, as llama.cpp's ``BertModel`` converter writes them): no causal mask,
layer norms with their epsilon, ``token_type_count``, the pooling type from the sentence-transformers
``modules.json`` (mean, CLS or last token), the pooler left out; a WordPiece tokenizer (:mod:`.vocab`).

Mixture-of-experts models (``LlamaModel`` for Mixtral, ``Qwen2MoeModel``, ``Qwen3MoeModel``,
``OlmoeModel``): the routers are ``ffn_gate_inp`` (F32), each projection of the experts of a block
one 3D tensor ``ffn_gate_exps`` / ``ffn_up_exps`` / ``ffn_down_exps`` (transformers 5's fused
``gate_up_proj`` cut into its gate and up rows), Qwen2-MoE's shared expert ``ffn_*_shexp`` with its
gate ``ffn_gate_inp_shexp``; keys ``expert_count``, ``expert_used_count`` and, for the Qwen families,
``expert_feed_forward_length`` (``expert_shared_feed_forward_length`` for Qwen2-MoE). llama.cpp fixes
what the configs leave free: whether the top-k routing weights are renormalized (llama / Mixtral and
qwen3moe do, qwen2moe and olmoe do not), every block a MoE block, Qwen2-MoE's shared expert always
there, OLMoE's key/value heads as many as its query heads; a config that differs is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf

from ampq import builtin
from ampq.errors import AmpqError

A = gguf.MODEL_ARCH


@dataclass(frozen=True)
class Architecture:
    arch: gguf.MODEL_ARCH
    permute_qk: bool = False  # llama's rotary halves interleaved per head
    norm_shift: float = 0.0  # added to every ``*norm.weight``
    swa_period: int = 0  # llama.cpp's fixed sliding-window pattern: every n-th layer global
    layers_27b: int = 0  # the block count llama.cpp takes for the 27B size (its other attention scale)
    moe: bool = False  # experts per block (ffn_*_exps)
    norm_top_k: bool | None = None  # whether llama.cpp renormalizes the top-k routing weights (MoE)
    expert_length: bool = False  # writes expert_feed_forward_length (moe_intermediate_size)
    shared_expert: bool = False  # Qwen2-MoE's gated shared expert
    encoder: bool = False  # BERT: bidirectional attention, layer norms, a pooled embedding out

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture(A.LLAMA, permute_qk=True),
    "MistralForCausalLM": Architecture(A.LLAMA, permute_qk=True),
    "Qwen2ForCausalLM": Architecture(A.QWEN2),
    "Qwen3ForCausalLM": Architecture(A.QWEN3),
    "Gemma2ForCausalLM": Architecture(A.GEMMA2, norm_shift=1.0, swa_period=2, layers_27b=46),
    "Gemma3ForCausalLM": Architecture(A.GEMMA3, norm_shift=1.0, swa_period=6, layers_27b=62),
    "Phi3ForCausalLM": Architecture(A.PHI3),
    "MixtralForCausalLM": Architecture(A.LLAMA, permute_qk=True, moe=True, norm_top_k=True),
    "Qwen2MoeForCausalLM": Architecture(A.QWEN2MOE, moe=True, norm_top_k=False, expert_length=True,
                                        shared_expert=True),
    "Qwen3MoeForCausalLM": Architecture(A.QWEN3MOE, moe=True, norm_top_k=True, expert_length=True),
    "OlmoeForCausalLM": Architecture(A.OLMOE, moe=True, norm_top_k=False),
    "BertModel": Architecture(A.BERT, encoder=True),
}
# what llama.cpp's BERT converter leaves out: the pooler (a sentence embedding is pooled by the
# pooling type instead) and the position ids buffer
ENCODER_DROPPED = ("pooler.", "embeddings.position_ids")
# sentence-transformers' pooling modes -> llama.cpp's pooling type
POOLING = {"pooling_mode_mean_tokens": gguf.PoolingType.MEAN, "pooling_mode_cls_token": gguf.PoolingType.CLS,
           "pooling_mode_lasttoken": gguf.PoolingType.LAST}
# mixture-of-experts families transformers 5 builds that this exporter does not write, and why
UNSUPPORTED_MOE = {
    "deepseek_v3": "DeepSeek-V3 (multi-head latent attention and grouped, biased sigmoid routing: llama.cpp's "
                   "deepseek2 architecture wants the attention's low-rank tensors split its own way)",
    "gpt_oss": "gpt-oss (experts stored transposed with biases, a clamped SwiGLU over interleaved halves and "
               "attention sinks: llama.cpp's gpt-oss architecture expects MXFP4 experts)",
    "llama4": "Llama-4 (experts stored transposed, sigmoid-scaled inputs, interleaved dense and MoE blocks "
              "with chunked attention)",
}
UNSUPPORTED_MOE["llama4_text"] = UNSUPPORTED_MOE["llama4"]
GEMMA_LOCAL_ROPE_BASE = 10000.0


def rope(config, kind: str = "full_attention") -> dict:
    """The rotary parameters of ``kind`` layers (transformers 5 nests them per layer type for Gemma 3)."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if kind in params and isinstance(params[kind], dict):
        params = params[kind]
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    return {**params, "rope_theta": float(theta), "rope_type": params.get("rope_type", params.get("type", "default"))}


def head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope_dimensions(config) -> int:
    """Rotated dimensions per head: Phi-3's ``partial_rotary_factor`` of the hidden size, per head."""
    factor = rope(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", None)
    if factor is None:
        return head_dim(config)
    return int(float(factor) * config.hidden_size) // config.num_attention_heads


def _refuse(directory: Path, what: str) -> AmpqError:
    return AmpqError(f"cannot export {directory} to GGUF: {what}")


def _check_gemma(directory: Path, config, spec: Architecture, warnings: list[str]) -> None:
    n = config.num_hidden_layers
    expected = ["full_attention" if (i + 1) % spec.swa_period == 0 else "sliding_attention" for i in range(n)]
    layer_types = list(getattr(config, "layer_types", None) or expected)
    if layer_types != expected and not (spec.arch == A.GEMMA3 and set(layer_types) == {"full_attention"}):
        raise _refuse(directory, f"its layers attend {layer_types}; llama.cpp's {spec.name} makes every "
                                 f"{spec.swa_period}th layer global and the others sliding-window")
    scale = float(getattr(config, "query_pre_attn_scalar", None) or head_dim(config))
    theirs = config.hidden_size / config.num_attention_heads if n == spec.layers_27b else head_dim(config)
    if scale != theirs:
        raise _refuse(directory, f"it scales attention by query_pre_attn_scalar {scale:g}^-1/2; llama.cpp's "
                                 f"{spec.name} uses {theirs:g}^-1/2 for {n} layers")
    if spec.arch == A.GEMMA2 and not getattr(config, "tie_word_embeddings", True):
        raise _refuse(directory, "its output head is not the embedding table; llama.cpp's gemma2 has no output "
                                 "tensor and multiplies by the embeddings")
    if spec.arch == A.GEMMA2 and (config.attn_logit_softcapping is None or config.final_logit_softcapping is None):
        raise _refuse(directory, "Gemma 2 without logit soft-capping: llama.cpp's gemma2 caps at 50 / 30 "
                                 "where the file names no other value")
    if spec.arch == A.GEMMA3:
        local = rope(config, "sliding_attention")
        if "sliding_attention" in layer_types and (local["rope_theta"] != GEMMA_LOCAL_ROPE_BASE
                                                   or local["rope_type"] != "default"):
            raise _refuse(directory, f"its sliding-window layers rotate with base {local['rope_theta']:g} "
                                     f"({local['rope_type']}); llama.cpp's gemma3 uses {GEMMA_LOCAL_ROPE_BASE:g}")


def experts(config) -> tuple[int, int]:
    """(experts per block, experts each token is routed to)."""
    n = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    return int(n), int(config.num_experts_per_tok)


def _check_moe(directory: Path, config, spec: Architecture) -> None:
    norm = bool(getattr(config, "norm_topk_prob", spec.norm_top_k))  # Mixtral has no switch: it renormalizes
    if norm != spec.norm_top_k:
        raise _refuse(directory, f"its router {'renormalizes' if norm else 'does not renormalize'} the top-k "
                                 f"weights (norm_topk_prob {norm}); llama.cpp's {spec.name} always "
                                 f"{'does' if spec.norm_top_k else 'does not'}")
    dense = list(getattr(config, "mlp_only_layers", None) or [])
    step = getattr(config, "decoder_sparse_step", None) or 1
    if dense or step != 1:
        raise _refuse(directory, f"some of its blocks are dense (mlp_only_layers {dense}, decoder_sparse_step "
                                 f"{step}); llama.cpp's {spec.name} makes every block a mixture of experts")
    if spec.shared_expert and not getattr(config, "shared_expert_intermediate_size", 0):
        raise _refuse(directory, f"it has no shared expert; llama.cpp's {spec.name} requires one")
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    if spec.arch == A.OLMOE and kv_heads != heads:  # its k norm spans the whole hidden size
        raise _refuse(directory, f"it has {kv_heads} key/value heads for {heads} query heads; llama.cpp's olmoe "
                                 "normalizes keys over the hidden size, as many key/value heads as query heads")
    if getattr(config, "clip_qkv", None) is not None:
        raise _refuse(directory, f"it clips q/k/v at {config.clip_qkv}; llama.cpp's {spec.name} does not")


def _check_encoder(directory: Path, config) -> None:
    position = getattr(config, "position_embedding_type", "absolute")
    if position != "absolute":
        raise _refuse(directory, f"its positions are {position!r}; llama.cpp's bert adds absolute position embeddings")
    if getattr(config, "hidden_act", "gelu") != "gelu":
        raise _refuse(directory, f"its feed-forward activation is {config.hidden_act}; llama.cpp's bert uses GELU")


def pooling(directory: Path, source: str | None, warnings: list[str]) -> gguf.PoolingType:
    """How llama.cpp pools the token states into one embedding: the sentence-transformers pooling of
    the checkpoint, or of the model it was quantized from (``source``: a folder, or a built-in
    name), as llama.cpp's converter reads it from ``modules.json``; mean pooling (what ampq's
    embedding evaluation does) where neither says, with a warning."""
    folders = [directory]
    if source:
        folders.append(Path(source))
        if source in builtin.MODELS:
            folders.append(builtin.cache_dir() / "models" / source)
    for folder in folders:
        modules = folder / "modules.json"
        if not modules.is_file():
            continue
        for module in json.loads(modules.read_text()):
            if module.get("type", "").endswith("Pooling"):
                config = json.loads((folder / module["path"] / "config.json").read_text())
                chosen = [POOLING[k] for k, v in config.items() if k in POOLING and v]
                if len(chosen) != 1:
                    raise _refuse(directory, f"its sentence-transformers pooling ({folder / module['path']}) is "
                                             "none of llama.cpp's (mean, cls, last token)")
                return chosen[0]
    warnings.append("no sentence-transformers pooling found beside the checkpoint or its source: written as mean "
                    "pooling (what ampq's embedding evaluation uses); llama.cpp's --pooling overrides it")
    return gguf.PoolingType.MEAN


def check(directory: Path, config, warnings: list[str]) -> Architecture:
    """The llama.cpp architecture of the checkpoint ``directory`` (its transformers ``config``), or
    an error saying why this exporter does not write it; warnings for what llama.cpp runs differently."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    kind = {"gemma3_text": "gemma3"}.get(model_type, model_type or "").replace("_", "")  # Gemma 3's text config
    cls = archs[0] if archs else next((c for c in ARCHITECTURES if c.lower().startswith(f"{kind}for")), None)
    if model_type in UNSUPPORTED_MOE:
        raise _refuse(directory, f"the GGUF export does not write {UNSUPPORTED_MOE[model_type]}; it writes the "
                                 "mixture-of-experts families Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE. Serve it "
                                 "with ampq (ampq.load, or from_pretrained after import ampq)")
    if cls not in ARCHITECTURES:
        raise _refuse(directory, f"it is {cls or model_type} (model_type {model_type!r}); this exporter writes "
                                 f"{', '.join(ARCHITECTURES)}. Use --to compressed-tensors, or llama.cpp's "
                                 "convert_hf_to_gguf.py on the unquantized model")
    spec = ARCHITECTURES[cls]
    if spec.encoder:
        _check_encoder(directory, config)
        return spec
    rope_type = rope(config)["rope_type"]
    if rope_type not in (None, "default") and not (spec.arch == A.GEMMA3 and rope_type == "linear"):
        raise _refuse(directory, f"its rope scaling ({rope_type}) is not written by this exporter; only plain "
                                 "rotary embeddings (and Gemma 3's linear scaling of its global layers) are")
    if model_type in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and getattr(config, "use_sliding_window", False):
        raise _refuse(directory, f"it uses sliding-window attention, which llama.cpp's {model_type} architecture "
                                 "does not run")
    if spec.swa_period:
        _check_gemma(directory, config, spec, warnings)
    if spec.moe:
        _check_moe(directory, config, spec)
    window = getattr(config, "sliding_window", None)
    if spec.arch in (A.LLAMA, A.PHI3) and window and window < config.max_position_embeddings:
        warnings.append(f"the model attends within a sliding window of {window} tokens; llama.cpp's {spec.name} "
                        f"architecture attends to the whole context, so beyond {window} tokens the two differ")
    return spec


def write_keys(writer, config, spec: Architecture) -> None:
    """The keys beyond the shared ones that llama.cpp's converter writes for ``spec``."""
    if spec.moe:
        count, used = experts(config)
        writer.add_expert_count(count)
        writer.add_expert_used_count(used)
        if spec.expert_length:
            writer.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if spec.shared_expert:
            writer.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    if spec.arch == A.GEMMA2:
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        writer.add_sliding_window(int(config.sliding_window))
    elif spec.arch == A.GEMMA3:
        if config.final_logit_softcapping:
            writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
        if "sliding_attention" in (getattr(config, "layer_types", None) or []):
            writer.add_sliding_window(int(config.sliding_window))
        full = rope(config)
        if full["rope_type"] == "linear":  # llama.cpp scales the global layers only, as transformers does
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(full["factor"]))
    elif spec.arch == A.PHI3:
        writer.add_rope_scaling_orig_ctx_len(int(getattr(config, "original_max_position_embeddings", None)
                                                 or config.max_position_embeddings))
        writer.add_sliding_window(int(getattr(config, "sliding_window", None) or 0))
