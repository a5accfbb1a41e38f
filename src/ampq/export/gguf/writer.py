"""A GGUF file as llama.cpp reads it: the architecture, its hyperparameter keys, the file type, the
tokenizer and the tensors, written with gguf-py's ``GGUFWriter``.

Which llama.cpp architecture a transformers class becomes is what llama.cpp's converter registers
for it (``@ModelBase.register`` in its conversion package): Llama and Mistral are ``llama`` (q/k
rows permuted), Qwen2 ``qwen2``, Qwen3 ``qwen3`` (its q/k norms included). Tensor names come from
gguf-py's tables for that architecture (``gguf.get_tensor_name_map``), so a tensor the architecture
does not know is refused by name, never guessed."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from ampq.version import __version__
from ampq.errors import AmpqError
from ampq.export.gguf.vocab import write_tokenizer

# transformers class -> (llama.cpp architecture, whether its q/k rows are permuted), as the converter maps them
ARCHITECTURES = {"LlamaForCausalLM": (gguf.MODEL_ARCH.LLAMA, True), "MistralForCausalLM": (gguf.MODEL_ARCH.LLAMA, True),
                 "Qwen2ForCausalLM": (gguf.MODEL_ARCH.QWEN2, False), "Qwen3ForCausalLM": (gguf.MODEL_ARCH.QWEN3, False)}
# what the converter does beyond names and keys for these, not written here yet
NOT_YET = {"Gemma2ForCausalLM": "norm weights stored plus one, logit soft-capping and sliding-window keys",
           "Gemma3ForCausalLM": "norm weights stored plus one, local and global rotary bases, sliding windows",
           "Phi3ForCausalLM": "fused qkv and gate/up tensors, partial rotary dimensions and long-rope factors"}
FILE_TYPES = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q4_0: "MOSTLY_Q4_0",
              T.Q4_1: "MOSTLY_Q4_1", T.Q5_0: "MOSTLY_Q5_0", T.Q5_1: "MOSTLY_Q5_1", T.Q8_0: "MOSTLY_Q8_0",
              T.Q2_K: "MOSTLY_Q2_K", T.Q3_K: "MOSTLY_Q3_K_M", T.Q4_K: "MOSTLY_Q4_K_M", T.Q5_K: "MOSTLY_Q5_K_M",
              T.Q6_K: "MOSTLY_Q6_K", T.IQ4_NL: "MOSTLY_IQ4_NL", T.IQ4_XS: "MOSTLY_IQ4_XS"}


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def check_architecture(directory: Path, config) -> tuple[gguf.MODEL_ARCH, bool]:
    """(llama.cpp architecture, whether q/k rows are permuted) of the checkpoint ``directory`` (its
    transformers ``config``), or an error saying why this exporter does not write it."""
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    cls = archs[0] if archs else next((c for c in [*ARCHITECTURES, *NOT_YET] if c.lower().startswith(f"{model_type}for")),
                                      None)
    if cls not in ARCHITECTURES:
        why = f" (not yet written: {NOT_YET[cls]})" if cls in NOT_YET else ""
        raise AmpqError(f"cannot export {directory} to GGUF: it is {cls or model_type} (model_type {model_type!r})"
                        f"{why}; this exporter writes {', '.join(ARCHITECTURES)}. Use --to compressed-tensors, or "
                        "llama.cpp's convert_hf_to_gguf.py on the unquantized model")
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise AmpqError(f"cannot export {directory} to GGUF: its rope scaling ({rope_type}) is not written by this "
                        "exporter; only models with plain rotary embeddings are supported")
    if model_type in ("qwen2", "qwen3") and getattr(config, "use_sliding_window", False):
        raise AmpqError(f"cannot export {directory} to GGUF: it uses sliding-window attention, which llama.cpp's "
                        f"{model_type} architecture does not run")
    return ARCHITECTURES[cls]


def _hyperparameters(writer, config, vocab_size: int) -> None:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(int(head_dim))
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(vocab_size))


def file_type(qtypes: list[T]) -> str:
    """llama.cpp's ``general.file_type`` for a file whose quantized layers are of ``qtypes``: the
    most common quantized type (16-bit layers count only when nothing is quantized)."""
    counts = Counter(qtypes)
    quantized = Counter({t: n for t, n in counts.items() if t not in (T.F16, T.BF16, T.F32)})
    return FILE_TYPES[(quantized or counts).most_common(1)[0][0] if counts else T.F32]


def write(path: Path, arch: gguf.MODEL_ARCH, config, vocab_size: int, name: str, kind: str, tokenizer: dict | None,
          tensors: dict[str, tuple[np.ndarray, T]]) -> dict:
    """The GGUF file ``path``: metadata (``kind``: the file type), the tokenizer, then ``tensors``
    (name -> (data, type); uint8 data is raw blocks of its type). Returns the tokenizer's summary."""
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    try:
        writer.add_type("model")
        writer.add_name(name)
        writer.add_quantized_by(f"ampq {__version__}")
        _hyperparameters(writer, config, vocab_size)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, kind)))
        summary = write_tokenizer(writer, tokenizer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, (data, qtype) in tensors.items():
            writer.add_tensor(tname, data, raw_dtype=qtype if data.dtype == np.uint8 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    return summary
