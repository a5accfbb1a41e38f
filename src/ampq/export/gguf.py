"""An ampq checkpoint as one GGUF file: what llama.cpp runs (and transformers' GGUF loader reads).

Written with the ``gguf`` package's own ``GGUFWriter``, in llama.cpp's conventions: its tensor
names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``, ``output``, from gguf-py's tensor
name map), its hyperparameter keys, its tokenizer keys, and, for the llama architecture, the
row permutation of ``attn_q`` / ``attn_k`` that llama.cpp's ``convert_hf_to_gguf.py`` applies to
``LlamaForCausalLM`` (Qwen2 is written unpermuted). The permutation reorders output rows; GGUF
blocks, like ampq's groups, run along the inputs, so quantized rows move whole.

Exact (ampq's codes and fp16 parameters repacked into GGUF blocks, no re-quantization; every such
layer is checked: gguf-py's ``gguf.quants.dequantize`` of the blocks written must equal ampq's
decoded weight bit for bit, else the export fails):

==================================  ======  ===================================================
ampq format                         GGUF    why it is the same number
==================================  ======  ===================================================
``int4-gN`` (asymmetric)            Q4_1    w = min + scale * q, q in [0, 15]: Q4_1's d * q + m
``int4-gN-sym``                     Q4_0    w = scale * (q - 8): Q4_0's d * (q - 8)
``int5-gN``                         Q5_1    w = min + scale * q, q in [0, 31]: Q5_1's d * q + m
``int5-gN-sym``                     Q5_0    w = scale * (q - 16): Q5_0's d * (q - 16)
``int8-gN-sym``                     Q8_0    w = scale * (q - 128): Q8_0's d * qs (int8)
``int2/3-gN`` (asymmetric)          Q4_1    the same d and m; the codes fit in 4 bits (widened)
``int2/3-gN-sym``                   Q4_0    the same d; code q - 2^(k-1) + 8 (widened)
``int6/7-gN-sym``                   Q8_0    the same d; code q - 2^(k-1) (widened)
``bf16`` / ``fp16`` layers          BF16 / F16, as stored
==================================  ======  ===================================================

for N = 32 or any multiple of 32, per channel (``-ch``) or per tensor (``-t``): a GGUF block is
32 inputs with its own scale, so a larger group is written as consecutive blocks repeating its
fp16 scale (and minimum), which holds the same values. The layer's inputs must be a multiple of
32 (GGUF rows are whole blocks).

Not expressible: asymmetric 6 to 8-bit integers (Q8_0 has no minimum; Q8_1 is llama.cpp's
activation type, not a weight type), groups that are not a multiple of 32, NF4/FP4, minifloats
(FP8, E2M1, ...), AWQ input scales kept outside the weights, activation schemes (llama.cpp picks
its own), adaptive layers above their base level, layers whose inputs are not a multiple of 32.
With ``nearest=True`` they are re-quantized by gguf-py's own quantizers from the weight ampq
decodes (input scales folded in) to the nearest type gguf-py can quantize: formats of 2-4 bits
to Q4_0 or Q4_1 and of 5 bits to Q5_0 or Q5_1, per layer whichever changes the weight least (mean
squared: Q4_0 clips the larger end of a block whose extremes are equal and opposite, as NF4's
often are, and on SmolLM2 NF4 -> Q4_0 everywhere gave perplexity 858 where Q4_1 gave 26); 6-8 bits
and adaptive layers to Q8_0; inputs not a multiple of 32 to F16. The summary reports how far the
weights moved (max and mean absolute change). gguf-py
0.19 quantizes F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, TQ1_0, TQ2_0 and MXFP4; the K-quants
(Q2_K ... Q6_K) and the IQ types it can only dequantize, so they are never targets here.

Embeddings and an untied output head are written as stored (F32, F16 or BF16); 1-D tensors
(norms, biases) as F32, as llama.cpp's converter does. The tokenizer (byte-level BPE only:
``tokenizer.ggml.model`` "gpt2") is written as llama.cpp's converter writes it: tokens, token
types, merges, special token ids, add-BOS/EOS flags and the chat template, with the pre-tokenizer
name read off ``tokenizer.json``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.export.common import base_of, change_summary, inexact_by_source, owner_of, source_of
from ampq.export.gguf_vocab import read_tokenizer, write_tokenizer
from ampq.io.atomic import atomic_file

BLOCK = 32  # inputs per block of every GGUF type written here
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def _require():
    try:
        import gguf
    except ImportError:
        raise AmpqError("exporting to GGUF needs the gguf package: pip install gguf") from None
    return gguf


@dataclass
class _Layer:
    name: str  # the module's name in the model
    module: nn.Module
    source: str  # what ampq stores, e.g. "int4-g32" or "int4-g128 + input scale"
    qtype: object = None  # gguf.GGMLQuantizationType written
    exact: bool = True
    widened: bool = False  # exact, in a wider type than the format's own bits
    why: str = ""  # why no GGUF type holds it exactly
    change: dict = field(default_factory=dict)


def _exact_type(layer: nn.Module, gguf) -> tuple[object | None, bool, str]:
    """(GGUF type holding ``layer`` exactly, whether it is wider than the format, "") or
    (None, False, why none does)."""
    from ampq.formats.integer import IntegerFormat
    from ampq.formats.minifloat import MinifloatFormat
    from ampq.formats.normal_float import NormalFloatFormat
    from ampq.formats.plain import PlainFloatFormat

    T = gguf.GGMLQuantizationType
    if getattr(layer, "residuals", None):
        return None, False, "adaptive layers above their base level add two formats"
    base = base_of(layer)
    fmt = base.format
    if base.input_scale is not None:
        return None, False, "AWQ input scales kept outside the weights (GGUF has no per-input scale)"
    if base.input_perm is not None:
        return None, False, "GPTQ act-order groups (GGUF blocks are of consecutive inputs)"
    if base.activation:
        return None, False, (f"{base.activation} activations (GGUF stores weights only; llama.cpp quantizes "
                             "activations its own way)")
    if isinstance(fmt, PlainFloatFormat):
        return (T.BF16 if fmt.name == "bf16" else T.F16), False, ""
    if base.in_features % BLOCK:
        return None, False, (f"{base.in_features} inputs, not a multiple of {BLOCK} "
                             f"(GGUF rows are whole blocks of {BLOCK})")
    if isinstance(fmt, IntegerFormat):
        if fmt.group_size and fmt.group_size % BLOCK:
            return None, False, (f"groups of {fmt.group_size} inputs (a GGUF block is {BLOCK} inputs with one scale, "
                                 f"so only groups of a multiple of {BLOCK} carry over)")
        if fmt.symmetric:
            qtype = T.Q4_0 if fmt.bits <= 4 else T.Q5_0 if fmt.bits == 5 else T.Q8_0
            return qtype, fmt.bits not in (4, 5, 8), ""
        if fmt.zero_point:  # Q4_1/Q5_1 keep m = -scale * zero in fp16: exact only where it rounds to itself
            _, params = fmt.unpack(base.stored(), base.shape)
            m = params.values["min"]
            if not torch.equal(m.half().float(), m):
                return None, False, ("zero points whose -scale * zero is not an fp16 number (Q4_1/Q5_1 store "
                                     "an fp16 minimum)")
        if fmt.bits <= 5:
            return (T.Q4_1 if fmt.bits <= 4 else T.Q5_1), fmt.bits not in (4, 5), ""
        return None, False, (f"w = min + scale * q with {fmt.bits}-bit codes: GGUF's 8-bit Q8_0 has no minimum "
                             "(Q8_1 is llama.cpp's activation type, not a weight type)")
    if isinstance(fmt, NormalFloatFormat):
        return None, False, ("a 16-value codebook with an absmax per block, not an integer grid "
                             "(IQ4_NL's codebook differs)")
    if isinstance(fmt, MinifloatFormat):
        return None, False, f"{fmt.name}: minifloat codes (GGUF's MXFP4 needs power-of-two E8M0 scales)"
    return None, False, f"{fmt.name} has no GGUF counterpart"


def _nearest_types(layer: nn.Module, gguf) -> list:
    """The GGUF types gguf-py can quantize that a layer with no exact counterpart may become: those
    of its width; the export keeps whichever re-quantizes its decoded weight with the smaller mean
    squared change."""
    T = gguf.GGMLQuantizationType
    base = base_of(layer)
    if base.in_features % BLOCK:
        return [T.F16]
    if getattr(layer, "residuals", None):
        return [T.Q8_0]
    bits = base.format.bits
    return [T.Q4_0, T.Q4_1] if bits <= 4 else [T.Q5_0, T.Q5_1] if bits == 5 else [T.Q8_0]


# ---- GGUF blocks from ampq's codes ------------------------------------------------------------------


def _f16_bytes(x: torch.Tensor) -> np.ndarray:
    """(..., 2) little-endian fp16 bytes of ``x`` (float32 values that came from fp16: exact)."""
    return np.ascontiguousarray(x.numpy().astype("<f2")).view(np.uint8).reshape(*x.shape, 2)


def _nibbles(c: torch.Tensor) -> np.ndarray:
    """(out, blocks, 16): element j in the low nibble of byte j, element j + 16 in its high nibble."""
    c = c.to(torch.uint8)
    return ((c[..., :16] & 0xF) | ((c[..., 16:] & 0xF) << 4)).numpy()


def _high_bits(c: torch.Tensor) -> np.ndarray:
    """(out, blocks, 4): the 5th bit of element j as bit j of a little-endian uint32 (Q5_0 / Q5_1's qh)."""
    bits = ((c.to(torch.int64) >> 4) & 1) << torch.arange(BLOCK, dtype=torch.int64)
    word = bits.sum(dim=-1, keepdim=True)
    return ((word >> (8 * torch.arange(4, dtype=torch.int64))) & 0xFF).to(torch.uint8).numpy()


def _exact_blocks(layer: nn.Module, qtype, gguf) -> np.ndarray:
    """(out, bytes per row) uint8: ``layer``'s codes and fp16 parameters as GGUF blocks of ``qtype``."""
    T = gguf.GGMLQuantizationType
    fmt = layer.format
    out, cols = layer.shape
    codes, params = fmt.unpack(layer.stored(), layer.shape)
    per_block = {k: v[:, ::BLOCK].contiguous() for k, v in fmt.expand(params.values, layer.shape).items()}
    nb = cols // BLOCK
    c = codes.reshape(out, nb, BLOCK)
    d = _f16_bytes(per_block["scale"])
    if qtype in (T.Q4_1, T.Q5_1):  # asymmetric: the same codes, d = scale, m = min
        parts = [d, _f16_bytes(per_block["min"])]
        parts += [_high_bits(c)] if qtype == T.Q5_1 else []
        parts.append(_nibbles(c))
    elif qtype in (T.Q4_0, T.Q5_0):  # symmetric: the same signed code re-centred on 8 or 16
        c = c - fmt.half + (8 if qtype == T.Q4_0 else 16)
        parts = [d] + ([_high_bits(c)] if qtype == T.Q5_0 else []) + [_nibbles(c)]
    elif qtype == T.Q8_0:  # symmetric: the signed code itself
        parts = [d, (c - fmt.half).to(torch.int8).numpy().view(np.uint8)]
    else:
        raise AssertionError(qtype)
    blocks = np.concatenate(parts, axis=-1)
    assert blocks.shape[-1] == gguf.GGML_QUANT_SIZES[qtype][1]
    return np.ascontiguousarray(blocks.reshape(out, -1))


def _plain_array(t: torch.Tensor, gguf) -> tuple[np.ndarray, object]:
    """A float tensor as GGUF F32 / F16 / BF16 data, as stored."""
    T = gguf.GGMLQuantizationType
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.uint8).numpy().reshape(*t.shape[:-1], -1), T.BF16
    if t.dtype == torch.float16:
        return t.numpy(), T.F16
    return t.float().numpy(), T.F32


def _requantize(w: np.ndarray, candidates: list, gguf) -> tuple[np.ndarray, np.ndarray, object]:
    """(data to write, what it decodes to, its type) for ``w`` re-quantized by gguf-py to whichever
    of ``candidates`` changes it least (mean squared; the first on a tie). F16 becomes F32 where a
    weight exceeds fp16's range."""
    T = gguf.GGMLQuantizationType
    best = None
    for qtype in candidates:
        if qtype == T.F16 and float(np.abs(w).max(initial=0.0)) > 65504:
            qtype = T.F32
        data = gguf.quants.quantize(w, qtype)
        decoded = gguf.quants.dequantize(data, qtype).reshape(w.shape)
        error = float(np.mean(np.square(decoded.astype(np.float64) - w)))
        if best is None or error < best[0]:
            best = (error, data, decoded, qtype)
    return best[1], best[2], best[3]


def _permute(w, n_head: int):
    """llama.cpp's q/k row order for the llama architecture (``LlamaModel.permute`` in its converter):
    each head's rotary halves interleaved. Works on weights, biases and rows of blocks alike."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ---- the model's description --------------------------------------------------------------------


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta if theta is not None else getattr(config, "rope_theta", 10000.0))


def _check_architecture(directory: Path, config) -> str:
    model_type = getattr(config, "model_type", None)
    archs = getattr(config, "architectures", None) or []
    if model_type not in ARCHITECTURES or (archs and archs[0] != ARCHITECTURES[model_type]):
        raise AmpqError(f"cannot export {directory} to GGUF: it is {archs[0] if archs else model_type} "
                        f"(model_type {model_type!r}); this exporter writes llama ({ARCHITECTURES['llama']}: Llama, "
                        f"SmolLM) and qwen2 ({ARCHITECTURES['qwen2']}: Qwen2, Qwen2.5) models. Use --to "
                        "compressed-tensors, or llama.cpp's convert_hf_to_gguf.py on the unquantized model")
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = params.get("rope_type", params.get("type", "default")) if isinstance(params, dict) else "default"
    if rope_type not in (None, "default"):
        raise AmpqError(f"cannot export {directory} to GGUF: its rope scaling ({rope_type}) is not written by this "
                        "exporter; only models with plain rotary embeddings are supported")
    if model_type == "qwen2" and getattr(config, "use_sliding_window", False):
        raise AmpqError(f"cannot export {directory} to GGUF: it uses sliding-window attention, which llama.cpp's "
                        "qwen2 architecture does not run")
    return model_type


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


# ---- the export ------------------------------------------------------------------------------------


def _check_target(out: Path, overwrite: bool) -> None:
    if out.is_dir():
        raise AmpqError(f"cannot export to {out}: it is a directory; give the path of the .gguf file to write")
    if out.exists() and not overwrite:
        raise AmpqError(f"cannot export to {out}: the file exists; pass --overwrite (overwrite=True) "
                        "or choose another path")


def export_gguf(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` as the GGUF file ``out`` (llama and qwen2 models).

    Quantized layers whose format has an exact GGUF counterpart are repacked block by block and
    checked bit for bit against ampq's decoding (see the module's docstring for the table); the
    others are refused, all in one error, unless ``nearest`` (then re-quantized by gguf-py to the
    nearest type it can write, the change reported). Atomic: written next to ``out``, then
    renamed over it; an existing ``out`` is refused unless ``overwrite``. Returns a summary.
    """
    gguf = _require()
    import ampq
    from ampq.models import tied_embeddings
    from ampq.nn import quantized_linears

    directory, out = Path(directory), Path(out)
    _check_target(out, overwrite)
    if not (directory / "ampq.json").is_file():
        raise AmpqError(f"{directory} is not an ampq checkpoint (no ampq.json); quantize and save a model "
                        "with ampq first")
    from transformers import AutoConfig

    arch = _check_architecture(directory, AutoConfig.from_pretrained(directory))
    model = ampq.load(directory)
    config = model.config
    T = gguf.GGMLQuantizationType
    vocab_size = int(getattr(config, "vocab_size", 0) or model.get_input_embeddings().weight.shape[0])
    warnings: list[str] = []
    tokenizer = read_tokenizer(directory, vocab_size, warnings, gguf)  # refused early, not after the work
    layers = quantized_linears(model)

    items: dict[str, _Layer] = {}
    for name, layer in layers.items():
        qtype, widened, why = _exact_type(layer, gguf)
        items[name] = _Layer(name, layer, source_of(layer), qtype, qtype is not None, widened, why)
    inexact = [it for it in items.values() if not it.exact]
    if inexact and not nearest:
        by_source, parts = inexact_by_source(inexact)
        targets = "; ".join(
            f"{src} -> {' or '.join(dict.fromkeys(t.name for it in its for t in _nearest_types(it.module, gguf)))}"
            for src, its in by_source.items())
        raise AmpqError(f"cannot export {directory} to GGUF exactly: {len(inexact)} layers have formats no GGUF "
                        f"type holds: {'; '.join(parts)}. GGUF holds int4/int5 (asymmetric or -sym) and int8-sym "
                        f"with groups of a multiple of {BLOCK} exactly (Q4_1/Q4_0, Q5_1/Q5_0, Q8_0). Pass --nearest "
                        f"(nearest=True) to re-quantize them from the weights ampq decodes with gguf-py ({targets}: "
                        "per layer, whichever moves the weights least); the export then reports how far they moved")
    for it in inexact:
        it.qtype = _nearest_types(it.module, gguf)

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA if arch == "llama" else gguf.MODEL_ARCH.QWEN2,
                                        config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads

    def permutation(module_name: str) -> int | None:  # the head count to permute rows by, or None
        if arch != "llama":
            return None
        leaf = module_name.rpartition(".")[2]
        return heads if leaf == "q_proj" else kv_heads if leaf == "k_proj" else None

    def gguf_name(key: str) -> str:
        mapped = name_map.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise AmpqError(f"cannot export {directory} to GGUF: tensor {key} has no llama.cpp name in the "
                            f"{arch} architecture; the checkpoint holds something this exporter does not write")
        return mapped[1]

    tied = tied_embeddings(model)
    state = model.state_dict()
    if tied:
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        state.pop(f"{head}.weight", None)

    # ---- tensors, in the state dict's order --------------------------------------------------------
    tensors: list[tuple[str, np.ndarray, object]] = []
    done: set[str] = set()
    for key, value in state.items():
        owner = owner_of(key, items)
        if owner is None:
            data, qtype = _plain_array(value, gguf)
            if value.dim() == 1:  # norms and biases: F32, as llama.cpp's converter writes them
                data, qtype = value.detach().float().numpy(), T.F32
            n_head = permutation(key.rpartition(".")[0])
            if n_head is not None:
                data = _permute(data, n_head)
            tensors.append((gguf_name(key), np.ascontiguousarray(data), qtype))
            continue
        if owner in done:
            continue
        done.add(owner)
        it = items[owner]
        layer, base = it.module, base_of(it.module)
        n_head = permutation(owner)
        weight = layer.dequantize(torch.float32)
        if base.input_scale is not None:
            weight = weight / base.input_scale.float()  # y = W (x / s) = (W / s) x
        if n_head is not None:
            weight = _permute(weight, n_head)
        expected = weight.numpy()
        if it.exact and it.qtype in (T.F16, T.BF16):
            data, _ = _plain_array(base.stored()["weight"].reshape(base.shape), gguf)
            decoded = gguf.quants.dequantize(data, it.qtype).reshape(expected.shape)
        elif it.exact:
            data = _exact_blocks(base, it.qtype, gguf)
            decoded = gguf.quants.dequantize(data, it.qtype).reshape(expected.shape)
        else:
            # re-quantized from the weight already in llama.cpp's row order
            data, decoded, it.qtype = _requantize(np.ascontiguousarray(expected), it.qtype, gguf)
            diff = np.abs(decoded - expected)
            it.change = {"from": it.source, "to": it.qtype.name, "max_abs_change": float(diff.max()),
                         "mean_abs_change": float(diff.mean()), "weights": int(diff.size)}
        if it.exact:
            if n_head is not None:
                data = _permute(data, n_head)
                decoded = _permute(decoded, n_head)
            if not np.array_equal(decoded, expected):
                worst = float(np.abs(decoded - expected).max())
                raise AmpqError(f"internal error: layer {owner} ({it.source}) does not come back exactly from its "
                                f"GGUF {it.qtype.name} blocks (max difference {worst:.3g}); please report it, with "
                                "the checkpoint's ampq.json")
        tensors.append((gguf_name(f"{owner}.weight"), np.ascontiguousarray(data), it.qtype))
        if layer.bias is not None:
            bias = layer.bias.detach().float().numpy()
            tensors.append((gguf_name(f"{owner}.bias"), _permute(bias, n_head) if n_head else bias, T.F32))

    # ---- metadata ---------------------------------------------------------------------------------------
    counts = Counter(it.qtype for it in items.values())
    quantized_counts = Counter({t: n for t, n in counts.items() if t not in (T.F16, T.BF16, T.F32)})
    main_type = (quantized_counts or counts).most_common(1)[0][0] if counts else T.F32
    file_types = {T.F32: "ALL_F32", T.F16: "MOSTLY_F16", T.BF16: "MOSTLY_BF16", T.Q4_0: "MOSTLY_Q4_0",
                  T.Q4_1: "MOSTLY_Q4_1", T.Q5_0: "MOSTLY_Q5_0", T.Q5_1: "MOSTLY_Q5_1", T.Q8_0: "MOSTLY_Q8_0"}
    widened = sorted({it.source for it in items.values() if it.widened})
    if widened:
        warnings.append(f"{', '.join(widened)} held exactly in wider GGUF blocks "
                        f"({', '.join(sorted({it.qtype.name for it in items.values() if it.widened}))}): the file is "
                        "larger than the checkpoint")
    lost = sorted({base_of(it.module).activation for it in items.values() if base_of(it.module).activation})
    if lost:
        warnings.append(f"activation schemes ({', '.join(lost)}) are not carried: llama.cpp handles activations "
                        "its own way")

    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(out) as tmp:
        writer = gguf.GGUFWriter(tmp, arch)
        name = (config.to_dict().get("_model_name_or_path") or "").strip() or directory.name
        writer.add_type("model")
        writer.add_name(name)
        writer.add_quantized_by(f"ampq {ampq.__version__}")
        _hyperparameters(writer, config, vocab_size)
        writer.add_file_type(int(getattr(gguf.LlamaFileType, file_types[main_type])))
        tokenizer = write_tokenizer(writer, tokenizer)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for tname, data, qtype in tensors:
            raw = qtype if data.dtype == np.uint8 else None
            writer.add_tensor(tname, data, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_target(out, overwrite)  # someone may have made it meanwhile

    converted = {n: it.change for n, it in items.items() if it.change}
    nbytes = out.stat().st_size
    summary = {
        "out": str(out), "source": str(directory), "architecture": arch,
        "layers": len(items), "exact": sum(1 for it in items.values() if it.exact),
        "widened": sum(1 for it in items.values() if it.widened),
        "types": {t.name: n for t, n in counts.most_common()},
        "formats": {src: sorted({it.qtype.name for it in items.values() if it.source == src})
                    for src in dict.fromkeys(it.source for it in items.values())},
        "file_type": file_types[main_type], "tensors": len(tensors), "tied_embeddings": tied,
        "tokenizer": tokenizer, "bytes": nbytes, "converted": converted,
        **change_summary(converted),
        "warnings": warnings,
    }
    change = summary.pop("change_text")
    types = ", ".join(f"{n} {t}" for t, n in summary["types"].items())
    summary["line"] = (f"{out}: GGUF ({arch}), {summary['layers']} quantized layers ({summary['exact']} exact{change}; "
                       f"{types}), {len(tensors)} tensors, {nbytes:,} bytes")
    return summary
