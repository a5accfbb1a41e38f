"""llama.cpp itself loads and runs ampq's GGUF exports, one tiny random model per architecture the
exporter writes, with K-quant, IQ4 and the older block types (skipped where llama-cpp-python is not
installed: it compiles llama.cpp, so CI leaves it out).

The tolerance is measured, not guessed. llama.cpp's CPU matmuls round each quantized layer's inputs
to 8 bits per block (Q8_0 / Q8_1 per 32 inputs, Q8_K per 256), BF16 layers' inputs to bf16, and keep
K and V in fp16; ampq's reference kernel rounds none of them. Rounding the linears' inputs the
same way in ampq's model moves its logits by ``rounding``; llama.cpp's logits must lie within twice
that of ampq's. Measured on these models: llama.cpp's distance is 0.97x to 1.02x ``rounding``, while
files written wrong land beyond the bound: llama's q/k rows left unpermuted 4.5x (a test below checks
that the bound catches it), Gemma 3's linear rope scaling left out 2.6x, Gemma 2's sliding window
written as 4096 22x, its norms not shifted by one 49x.
"""

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

import torch  # noqa: E402

import ampq  # noqa: E402
from ampq.exporters.gguf import export_gguf  # noqa: E402
from ampq.nn import quantized_linears  # noqa: E402
from _llama_cpp import activation_rounding, llama_cpp_logits  # noqa: E402
from _tiny_models import ARCHITECTURES, VOCAB, tiny_model, tiny_tokenizer  # noqa: E402

torch.set_num_threads(1)
IDS = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))

# every K-quant and IQ4 type (inputs of 256 and 512: whole K-quant blocks), and the older block types
K_QUANTS = {"*q_proj": "q3_k", "*k_proj": "iq4_xs", "*v_proj": "q6_k", "*o_proj": "q5_k",
            "*gate_proj": "q4_k", "*up_proj": "iq4_nl", "*down_proj": "q2_k"}
LEGACY = {"*q_proj": "int4-g32-sym", "*k_proj": "int4-g32", "*v_proj": "int5-g32", "*o_proj": "int5-g32-sym",
          "*gate_proj": "int8-g32-sym", "*up_proj": "bf16", "*down_proj": "int4-g64"}


def _export(tmp_path, model, spec):
    ampq.quantize(model, spec, progress=False)
    ampq.save(model, tmp_path / "ckpt", tiny_tokenizer(VOCAB))
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    return ampq.load(tmp_path / "ckpt"), summary


def _distances(model, path) -> tuple[float, float]:
    """(llama.cpp's relative distance to ampq's logits, what rounding the activations alone moves them)."""
    with ampq.kernels.use("reference"), torch.no_grad():
        ours = model(IDS).logits[0].float()
        hooks = [layer.register_forward_pre_hook(lambda _, args, r=activation_rounding(layer.format_name): (r(args[0]),))
                 for layer in quantized_linears(model).values()]
        try:
            rounded = model(IDS).logits[0].float()
        finally:
            for h in hooks:
                h.remove()
    theirs = llama_cpp_logits(path, IDS[0].tolist())
    norm = float(ours.norm())
    return float((theirs - ours).norm()) / norm, float((rounded - ours).norm()) / norm


@pytest.mark.parametrize("spec", ["k_quants", "legacy"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_llama_cpp_runs_the_export(tmp_path, arch, spec):
    model, summary = _export(tmp_path, tiny_model(arch), K_QUANTS if spec == "k_quants" else LEGACY)
    assert summary["exact"] == summary["layers"] and not summary["warnings"]
    distance, rounding = _distances(model, tmp_path / "m.gguf")
    assert 0 < rounding < 0.2  # the rounding moves the logits a little: a scale to measure against
    assert distance <= 2 * rounding, (distance, rounding)


def test_the_bound_catches_a_wrong_file(tmp_path, monkeypatch):
    """llama's q/k rows written in transformers' order (the converter's permutation left out): the
    rotary halves pair up wrongly in llama.cpp, and the test above would fail."""
    from ampq.exporters.gguf import architectures

    monkeypatch.setitem(architectures.ARCHITECTURES, "LlamaForCausalLM", architectures.Architecture(gguf.MODEL_ARCH.LLAMA))
    model, _ = _export(tmp_path, tiny_model("llama"), K_QUANTS)
    distance, rounding = _distances(model, tmp_path / "m.gguf")
    assert distance > 2 * rounding, (distance, rounding)


TEXTS = ["the quick brown fox", " the  lazy\ndog, 12 345 and 6789", "héllo wörld ☃ — ünïcode", "written once</s>",
         "  leading spaces", "tests of the export"]


@pytest.mark.parametrize("arch,prepend_space", [("llama", True), ("mistral", True), ("phi3", True), ("gemma2", False)])
def test_llama_cpp_tokenizes_a_sentencepiece_export_as_transformers_does(tmp_path, arch, prepend_space):
    from _tiny_models import tiny_sentencepiece_tokenizer

    tok = tiny_sentencepiece_tokenizer(400, prepend_space)
    model = tiny_model(arch, vocab_size=400)
    ampq.quantize(model, "int4-g32-sym", progress=False)
    ampq.save(model, tmp_path / "ckpt", tok)
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["tokenizer"]["model"] == "llama" and summary["tokenizer"]["add_space_prefix"] == prepend_space
    llm = llama_cpp.Llama(str(tmp_path / "m.gguf"), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ours = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == ours, text
            if prepend_space or not text.startswith(" "):  # without a prefix, llama.cpp's decoding still drops one
                assert llm.detokenize(ours).decode() == tok.decode(ours, skip_special_tokens=True), text
    finally:
        llm.close()
