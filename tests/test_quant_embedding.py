"""A quantized token embedding table (--embeddings): read by rows exactly as the whole table decodes,
the tied head multiplying by the same stored table, saved and loaded back, planned for under a size
budget, written to GGUF as llama.cpp's token_embd (and run by llama.cpp), refused where an engine
keeps embeddings in 16 bits."""

import json

import pytest
import torch
from torch import nn

import ampq
from ampq import AmpqError, kernels
from ampq.pipeline.budget import Budget
from ampq.pipeline.planner import embedding_bytes_saved
from ampq.quant_embedding import QuantEmbedding, TiedQuantHead, quantize_embeddings
from ampq.report import model_bytes
from test_model_io import IDS, logits, tiny_llama

CALIB = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(5))
ROW_FORMATS = ["int4-g32", "int4-g128", "int8-g32-sym", "int8-ch", "nf4-b32", "fp8-e4m3", "nvfp4", "int3-g32"]


@pytest.mark.parametrize("fmt", ROW_FORMATS)
def test_a_lookup_decodes_the_rows_the_whole_table_decodes(fmt):
    torch.manual_seed(0)
    emb = nn.Embedding(300, 96)
    table = QuantEmbedding.from_embedding(emb, fmt)
    ids = torch.tensor([[5, 299, 5, 0], [7, 7, 1, 2]])
    full = table.dequantize()
    assert torch.equal(table(ids), full[ids])
    # and the table is the format's rounding of the weights, not something else
    assert torch.equal(full, table.format.fake_quantize(emb.weight.detach().float()))


def test_k_quant_rows_and_the_embedding_scale():
    emb = nn.Embedding(40, 256)
    emb.embed_scale = torch.tensor(16.0)  # as Gemma's scaled embedding holds it
    table = QuantEmbedding.from_embedding(emb, "q6_k")
    ids = torch.tensor([3, 39, 3])
    assert torch.equal(table(ids), table.dequantize()[ids] * 16.0)


@pytest.mark.parametrize("fmt, why", [("nf4-b32-dq", "shared across rows"), ("q6_k", "whole blocks of 256")])
def test_a_table_the_format_cannot_hold_by_rows_is_refused_in_one_line(fmt, why):
    model = tiny_llama()
    with pytest.raises(AmpqError, match=why) as e:
        quantize_embeddings(model, fmt)
    assert "\n" not in str(e.value) and "--embeddings" in str(e.value)
    assert isinstance(model.model.embed_tokens, nn.Embedding)  # nothing changed


def test_the_tied_head_multiplies_by_the_same_stored_table():
    model, reference = tiny_llama(), tiny_llama()
    ampq.quantize(model, "int8-ch", embeddings="int4-g32", progress=False)
    assert isinstance(model.lm_head, TiedQuantHead) and model.lm_head.table is model.model.embed_tokens
    assert not any(k.startswith("lm_head") for k in model.state_dict())  # stored once
    ampq.quantize(reference, "int8-ch", progress=False)
    with torch.no_grad():  # the float model with the decoded table as embeddings and head
        reference.model.embed_tokens.weight.copy_(model.model.embed_tokens.dequantize())
    with kernels.use("reference"):
        ours, theirs = logits(model), logits(reference)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tie", [True, False])
def test_save_and_load_give_the_same_logits(tmp_path, tie):
    model = ampq.quantize(tiny_llama(tie=tie), "int4-g32", embeddings="int8-g32-sym", progress=False)
    ampq.save(model, tmp_path / "m")
    manifest = json.loads((tmp_path / "m" / "ampq.json").read_text())
    entry = manifest["layers"]["model.embed_tokens"]
    assert entry["kind"] == "embedding" and entry["format"] == "int8-g32-sym" and entry["shape"] == [256, 96]
    assert "embeddings (int8-g32-sym)" in manifest["coverage"]["line"]
    loaded = ampq.load(tmp_path / "m")
    assert isinstance(loaded.model.embed_tokens, QuantEmbedding)
    assert isinstance(loaded.lm_head, TiedQuantHead) == tie
    assert torch.equal(logits(loaded), logits(model))
    assert model_bytes(loaded) == model_bytes(model)


def test_a_size_budget_gives_the_saved_bytes_to_the_linears():
    base = tiny_llama()
    cands = ("int3-g32:rtn", "int4-g32:rtn", "int8-ch:rtn", "bf16")
    size = model_bytes(base) // 6  # below the float table plus 3-bit linears, above a 4-bit table plus them
    saved = embedding_bytes_saved(base, "int4-g32")
    table = base.model.embed_tokens.weight
    assert saved == table.numel() * 4 - ampq.formats.get_format("int4-g32").nbytes(tuple(table.shape))
    with pytest.raises(AmpqError):  # with the float table it cannot fit
        ampq.quantize(tiny_llama(), Budget(bytes=size, candidates=cands), calibration=CALIB, progress=False)
    model = ampq.quantize(tiny_llama(), Budget(bytes=size, candidates=cands, embeddings="int4-g32"),
                          calibration=CALIB, progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model_bytes(model) <= size
    assert model.ampq_manifest["plan"]["embeddings"] == "int4-g32"


def test_a_plan_names_its_embeddings_and_quantize_keeps_to_them(tmp_path):
    cands = ("int4-g32:rtn", "int8-ch:rtn")
    plan = ampq.plan(tiny_llama(), Budget(bits=6, candidates=cands, embeddings="int8-ch"), calibration=CALIB,
                     progress=False)
    path = plan.save(tmp_path / "plan.json")
    loaded = ampq.Plan.load(path)
    assert loaded.embeddings == "int8-ch"
    model = ampq.quantize(tiny_llama(), loaded, calibration=CALIB, progress=False)
    assert model.model.embed_tokens.format_name == "int8-ch"
    with pytest.raises(AmpqError, match="made with the embedding table in int8-ch"):
        ampq.quantize(tiny_llama(), loaded, calibration=CALIB, progress=False, embeddings="int4-g32")


def test_engines_that_keep_embeddings_in_16_bits_refuse_in_one_line(tmp_path):
    from transformers import AutoModelForCausalLM

    from ampq.exporters.compressed_tensors import export_compressed_tensors

    model = ampq.quantize(tiny_llama(), "int8-ch-sym", embeddings="int8-ch", progress=False)
    ampq.save(model, tmp_path / "m")
    with pytest.raises(AmpqError, match="keeps embeddings in 16 bits; quantize without --embeddings") as e:
        export_compressed_tensors(tmp_path / "m", tmp_path / "ct")
    assert "\n" not in str(e.value) and not (tmp_path / "ct").exists()
    with pytest.raises(ValueError, match="load it with ampq.load_model"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "m")


def test_llama_cpp_reads_a_quantized_tied_table_as_embeddings_and_head(tmp_path):
    pytest.importorskip("llama_cpp")
    gguf = pytest.importorskip("gguf")
    from _llama_cpp import llama_cpp_logits
    from _tiny_models import VOCAB, tiny_model, tiny_tokenizer

    from ampq.exporters.gguf import export_gguf

    torch.set_num_threads(1)
    ids = torch.randint(2, VOCAB, (1, 40), generator=torch.Generator().manual_seed(1))
    model = ampq.quantize(tiny_model("llama", tie_word_embeddings=True), "int8-g32-sym", embeddings="q6_k",
                          progress=False)
    ampq.save(model, tmp_path / "ckpt", tiny_tokenizer(VOCAB))
    summary = export_gguf(tmp_path / "ckpt", tmp_path / "m.gguf")
    assert summary["exact"] == summary["layers"] == 15 and not summary["warnings"]
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "m.gguf")).tensors}
    assert types["token_embd.weight"] == "Q6_K" and "output.weight" not in types
    with kernels.use("reference"), torch.no_grad():
        ours = model(ids).logits[0]
    theirs = llama_cpp_logits(tmp_path / "m.gguf", ids[0].tolist())
    # Q8_0 linears: llama.cpp's 8-bit activations are the only difference; a float table would be far off
    assert float((theirs - ours).norm() / ours.norm()) < 0.02


def test_an_untied_head_in_its_own_format_is_counted_by_a_size_budget():
    from ampq.pipeline.planner import head_bytes_saved

    cands = ("int3-g32:rtn", "int4-g32:rtn", "int8-ch:rtn", "bf16")
    base = tiny_llama(tie=False)
    assert head_bytes_saved(tiny_llama(tie=True), "int8-g32-sym") == 0  # a tied head is the table
    size = model_bytes(base) // 6
    budget = Budget(bytes=size, candidates=cands, embeddings="int4-g32", head="int8-g32-sym")
    model = ampq.quantize(tiny_llama(tie=False), budget, calibration=CALIB, progress=False)
    assert model.lm_head.format_name == "int8-g32-sym" and isinstance(model.model.embed_tokens, QuantEmbedding)
    assert model_bytes(model) <= size and model.ampq_manifest["plan"]["head"] == "int8-g32-sym"


def test_a_head_without_a_format_is_refused_before_any_work():
    plan = ampq.plan(tiny_llama(), Budget(bits=6, candidates=("int4-g32:rtn", "int8-ch:rtn")), calibration=CALIB,
                     progress=False)
    model = tiny_llama(tie=False)
    with pytest.raises(AmpqError, match="--lm-head int8-g32-sym"):
        ampq.quantize(model, plan, calibration=CALIB, progress=False, lm_head=True)
    assert not ampq.nn.quantized_linears(model)


def test_uniform_peers_are_set_beside_a_budget_with_its_embedding_table():
    import copy

    from ampq.comparison import uniform_peers

    original = tiny_llama()
    budget = Budget(bits=5, candidates=("int4-g32:rtn", "int8-ch:rtn"), embeddings="int8-ch")
    model = ampq.quantize(copy.deepcopy(original), budget, calibration=CALIB, progress=False)
    peers = uniform_peers(model, original, budget, calibration=CALIB, progress=False)
    (name, peer), = peers.items()
    assert peer.model.embed_tokens.format_name == "int8-ch" and isinstance(original.model.embed_tokens, nn.Embedding)
    assert {m.format_name for m in ampq.nn.quantized_linears(peer).values()} == {name.split()[-1]}
    assert uniform_peers(model, original, budget, "none", progress=False) == {}


def test_a_compiled_decoder_reads_the_quantized_table_and_tied_head():
    torch.manual_seed(0)
    model = ampq.quantize(tiny_llama(), "int4-g32", embeddings="int8-g32-sym", progress=False)
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(3))
    eager = model.generate(ids, max_new_tokens=6, do_sample=False)[:, ids.shape[1]:]
    compiled = ampq.compile(model, max_len=32).generate(ids, 6)
    assert torch.equal(torch.as_tensor(compiled).reshape(eager.shape), eager)


def test_a_plan_for_vllm_refuses_a_quantized_table_up_front():
    with pytest.raises(AmpqError, match="vLLM keeps the embedding table in 16 bits"):
        Budget(bits=4.25, target="vllm", embeddings="int8-ch")


def test_a_table_holding_nan_is_refused_in_one_line():
    model = tiny_llama()
    with torch.no_grad():
        model.model.embed_tokens.weight[3, 5] = float("nan")
    with pytest.raises(AmpqError, match="cannot quantize the embedding table") as e:
        quantize_embeddings(model, "int8-ch")
    assert "\n" not in str(e.value) and isinstance(model.model.embed_tokens, nn.Embedding)
