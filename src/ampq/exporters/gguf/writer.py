"""A GGUF file as llama.cpp reads it: the architecture, its hyperparameter keys, the file type, the
tokenizer and the tensors, written with gguf-py's ``GGUFWriter``. Which architecture, and its own
keys, are :mod:`.architectures`'."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T

from ampq.version import __version__
from ampq.exporters.gguf import architectures
from ampq.exporters.gguf.vocab import write_tokenizer

FILE_TYPES = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q4_0: "MOSTLY_Q4_0",
              T.Q4_1: "MOSTLY_Q4_1", T.Q5_0: "MOSTLY_Q5_0", T.Q5_1: "MOSTLY_Q5_1", T.Q8_0: "MOSTLY_Q8_0",
              T.Q2_K: "MOSTLY_Q2_K", T.Q3_K: "MOSTLY_Q3_K_M", T.Q4_K: "MOSTLY_Q4_K_M", T.Q5_K: "MOSTLY_Q5_K_M",
              T.Q6_K: "MOSTLY_Q6_K", T.IQ4_NL: "MOSTLY_IQ4_NL", T.IQ4_XS: "MOSTLY_IQ4_XS"}


def _encoder_hyperparameters(writer, config, vocab_size: int, pooling) -> None:
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_layer_norm_eps(float(config.layer_norm_eps))
    writer.add_causal_attention(False)
    writer.add_pooling_type(pooling)
    writer.add_token_type_count(int(getattr(config, "type_vocab_size", 1) or 1))
    writer.add_vocab_size(int(vocab_size))


def _hyperparameters(writer, config, vocab_size: int, spec: architectures.Architecture) -> None:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = architectures.head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(heads))
    writer.add_head_count_kv(int(kv_heads))
    writer.add_rope_freq_base(architectures.rope(config)["rope_theta"])
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(architectures.rope_dimensions(config))
    if head_dim != config.hidden_size // heads or spec.norm_shift:  # the Gemma converters always write it
        writer.add_key_length(int(head_dim))
        writer.add_value_length(int(head_dim))
    writer.add_vocab_size(int(vocab_size))
    architectures.write_keys(writer, config, spec)


def file_type(qtypes: list[T]) -> str:
    """llama.cpp's ``general.file_type`` for a file whose quantized layers are of ``qtypes``: the
    most common quantized type (16-bit layers count only when nothing is quantized)."""
    counts = Counter(qtypes)
    quantized = Counter({t: n for t, n in counts.items() if t not in (T.F16, T.BF16, T.F32)})
    return FILE_TYPES[(quantized or counts).most_common(1)[0][0] if counts else T.F32]


def write(path: Path, spec: architectures.Architecture, config, vocab_size: int, name: str, kind: str,
          tokenizer: dict | None, tensors: dict[str, tuple[np.ndarray, T]], pooling=None) -> dict:
    """The GGUF file ``path``: metadata (``kind``: the file type), the tokenizer, then ``tensors``
    (name -> (data, type); uint8 data is raw blocks of its type). Returns the tokenizer's summary."""
    writer = gguf.GGUFWriter(path, spec.name)
    try:
        writer.add_type("model")
        writer.add_name(name)
        writer.add_quantized_by(f"ampq {__version__}")
        if spec.encoder:
            _encoder_hyperparameters(writer, config, vocab_size, pooling)
        else:
            _hyperparameters(writer, config, vocab_size, spec)
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
