"""BERT encoders to GGUF, as llama.cpp's converter writes them: the bert architecture's keys, the
WordPiece vocabulary in phantom-space form, the pooling type of the sentence-transformers model,
and llama.cpp's own embeddings against ampq's (when llama-cpp-python is installed)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import ampq

gguf = pytest.importorskip("gguf")

from ampq.errors import AmpqError  # noqa: E402
from ampq.exporters.gguf import architectures  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog.", "Quantization makes models smaller: naïve café, Ünïcode!",
         "def f(x): return x**2  # squares"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The built-in all-MiniLM-L6-v2 quantized to int4-g32 (Q4_1) and exported."""
    tmp = tmp_path_factory.mktemp("bert")
    model, tok = ampq.load_model("all-minilm-l6-v2")
    ampq.quantize(model, "int4-g32", progress=False, output=tmp / "ckpt", tokenizer=tok)
    summary = ampq.export(tmp / "ckpt", tmp / "minilm.gguf", to="gguf")
    return tmp / "ckpt", tmp / "minilm.gguf", summary


def _field(reader, key):
    f = reader.fields[key]
    return f.contents() if hasattr(f, "contents") else f.parts[f.data[0]]


def test_bert_keys_tensors_and_vocabulary_are_llama_cpp_s(exported):
    ckpt, path, summary = exported
    assert summary["architecture"] == "bert" and summary["types"] == {"Q4_1": 36}
    reader = gguf.GGUFReader(str(path))
    assert _field(reader, "general.architecture") == "bert"
    assert _field(reader, "bert.attention.causal") is False
    assert _field(reader, "bert.pooling_type") == int(gguf.PoolingType.MEAN)  # the source's 1_Pooling
    assert _field(reader, "bert.attention.layer_norm_epsilon") == pytest.approx(1e-12)
    assert _field(reader, "tokenizer.ggml.token_type_count") == 2
    assert _field(reader, "tokenizer.ggml.model") == "bert"
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "position_embd.weight", "token_types.weight", "token_embd_norm.bias",
            "blk.5.attn_q.weight", "blk.5.attn_output_norm.weight", "blk.5.ffn_up.weight",
            "blk.5.layer_output_norm.bias"} <= names
    assert not any("pooler" in n for n in names) and any("pooler" in w for w in summary["warnings"])
    tokens = _field(reader, "tokenizer.ggml.tokens")
    vocab = json.loads((ckpt / "tokenizer.json").read_text())["model"]["vocab"]
    assert tokens[vocab["the"]] == "\u2581the" and tokens[vocab["##ing"]] == "ing"
    assert tokens[vocab["[CLS]"]] == "[CLS]"
    assert _field(reader, "tokenizer.ggml.bos_token_id") == vocab["[CLS]"]
    assert _field(reader, "tokenizer.ggml.eos_token_id") == vocab["[SEP]"]


def test_llama_cpp_tokenizes_and_embeds_as_ampq(exported):
    pytest.importorskip("llama_cpp")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from _llama import load_llama

    ckpt, path, _ = exported
    model, tok = ampq.load_model(str(ckpt))
    llm = load_llama(path, embedding=True, n_ctx=512, n_batch=512, n_ubatch=512, n_threads=1, verbose=False)
    try:
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            assert llm.tokenize(text.encode(), add_bos=True, special=False) == ids
            with torch.no_grad():
                ours = model(torch.tensor([ids])).last_hidden_state[0].mean(0)
            theirs = torch.tensor(llm.embed(text))
            # llama.cpp rounds the activations to 8 bits in its Q4_1 matmuls; the weights are ampq's bit for bit
            assert torch.nn.functional.cosine_similarity(ours, theirs, dim=0) > 0.999
    finally:
        llm.close()


def test_a_cased_wordpiece_tokenizer_is_refused(exported, tmp_path):
    from ampq.exporters.gguf.vocab import read_tokenizer

    ckpt, _, _ = exported
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ckpt / name, tmp_path / name)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    assert read_tokenizer(tmp_path, 30522, [])["model"] == "bert"
    spec["normalizer"]["lowercase"] = False
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(AmpqError, match="keeps case"):
        read_tokenizer(tmp_path, 30522, [])


def test_pooling_follows_sentence_transformers_and_says_when_it_assumes(tmp_path):
    folder = tmp_path / "st"
    (folder / "1_Pooling").mkdir(parents=True)
    (folder / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer", "path": ""},
                                                     {"type": "sentence_transformers.models.Pooling",
                                                      "path": "1_Pooling"}]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_cls_token": True,
                                                                  "pooling_mode_mean_tokens": False}))
    warnings = []
    assert architectures.pooling(tmp_path / "ckpt", str(folder), warnings) == gguf.PoolingType.CLS and not warnings
    assert architectures.pooling(tmp_path / "ckpt", None, warnings) == gguf.PoolingType.MEAN
    assert "mean pooling" in warnings[0]
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_max_tokens": True}))
    with pytest.raises(AmpqError, match="none of llama.cpp's"):
        architectures.pooling(tmp_path / "ckpt", str(folder), [])
