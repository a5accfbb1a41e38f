"""Encoders (BERT family) and vision-language models: quantized, saved, loaded as the class they
were saved from, and evaluated by their embeddings; a block structure ampq cannot place refused."""

import json

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForMaskedLM, BertModel, BertTokenizerFast

import ampq
from ampq import AmpqError, QuantLinear
from ampq.cli import main
from ampq.similarity import compare, embed

WORDS = ("the a of and to in is was for on with as by at from it that this he she they river city ship war "
         "music film team game year school church king army water light story song band road town world").split()


def tiny_bert(cls=BertModel, seed=0):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=5 + len(WORDS), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=64)
    return cls(cfg).eval()


@pytest.fixture(scope="module")
def tokenizer():
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS])})
    assert len(tok) == 5 + len(WORDS)
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A text of 400 lines of words drawn at random (the eval half gives 200 pieces)."""
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(12, 40, (400,), generator=g)]
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


IDS = torch.randint(5, 5 + len(WORDS), (2, 20), generator=torch.Generator().manual_seed(1))


def hidden(model):
    with torch.no_grad():
        return model(IDS, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("fmt", ["int8-ch", "int4-g32", "nf4-b32-dq"])
def test_encoder_saves_and_loads_identical_as_its_own_class(tmp_path, fmt):
    model = ampq.quantize(tiny_bert(), fmt, progress=False)
    assert isinstance(model.encoder.layer[1].intermediate.dense, QuantLinear)
    assert isinstance(model.pooler.dense, nn.Linear)  # outside the blocks: kept
    ampq.save(model, tmp_path / "q")
    loaded = ampq.load(tmp_path / "q")
    assert type(loaded) is BertModel  # not BertLMHeadModel, which AutoModelForCausalLM would build
    assert torch.equal(hidden(loaded), hidden(model))
    assert json.loads((tmp_path / "q" / "ampq.json").read_text())["model_class"] == "BertModel"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["architectures"] == ["BertModel"]


def test_the_class_saved_is_the_class_loaded_even_against_config_architectures(tmp_path):
    model = tiny_bert(BertForMaskedLM)
    model.config.architectures = ["BertModel"]  # a stale entry, as a hub config may carry
    ampq.save(ampq.quantize(model, "int8-ch", progress=False), tmp_path / "q")
    loaded = ampq.load(tmp_path / "q")
    assert type(loaded) is BertForMaskedLM
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, model(IDS).logits)


def test_from_pretrained_and_load_model_rebuild_the_encoder(tmp_path, tokenizer):
    from transformers import AutoModel

    float_dir = tmp_path / "float"
    tiny_bert().save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    model, tok = ampq.load_model(str(float_dir))
    assert type(model) is BertModel and tok is not None
    ampq.quantize(model, "int8-ch", output=tmp_path / "q", tokenizer=tok, progress=False)
    again, _ = ampq.load_model(str(tmp_path / "q"))
    hf = AutoModel.from_pretrained(tmp_path / "q")
    assert type(again) is BertModel and type(hf) is BertModel
    assert torch.equal(hidden(hf), hidden(model)) and torch.equal(hidden(again), hidden(model))


def test_a_checkpoint_without_a_recorded_class_follows_config_architectures(tmp_path):
    ampq.save(ampq.quantize(tiny_bert(), "int8-ch", progress=False), tmp_path / "q")
    manifest = json.loads((tmp_path / "q" / "ampq.json").read_text())
    from ampq.io.config import model_class, model_config

    assert model_class(model_config(tmp_path / "q")) is BertModel
    assert model_class(model_config(tmp_path / "q"), "os") is BertModel  # not a transformers model: ignored
    assert manifest["model_class"] == "BertModel"


def test_embedding_figures_against_a_hand_computed_reference():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 16, generator=g)
    noisy = ref + 0.05 * torch.randn(50, 16, generator=g)
    q = compare(noisy, ref, 128, "t")
    cos = torch.nn.functional.cosine_similarity(noisy, ref, dim=-1)
    assert q.cosine == pytest.approx(float(cos.mean())) and q.cosine_min == pytest.approx(float(cos.min()))
    unit = torch.nn.functional.normalize(ref, dim=-1)
    sim = unit @ unit.T - 3 * torch.eye(50)
    unit_n = torch.nn.functional.normalize(noisy, dim=-1)
    sim_n = unit_n @ unit_n.T - 3 * torch.eye(50)
    assert q.neighbours == pytest.approx(float((sim.argmax(1) == sim_n.argmax(1)).float().mean()))
    assert compare(ref, ref, 128, "t").neighbours == 1.0 and compare(ref, ref, 128, "t").overlap == 1.0
    shuffled = compare(ref[torch.randperm(50, generator=g)], ref, 128, "t")
    assert shuffled.neighbours < 0.3 and shuffled.cosine < 0.5


def test_mean_pooling_ignores_padding(tokenizer):
    model = tiny_bert()
    texts = ["the river city", "a ship of the war in the city by the road to the town"]
    both = embed(model, tokenizer, texts)
    alone = embed(model, tokenizer, texts[:1])
    torch.testing.assert_close(both[:1], alone, rtol=1e-4, atol=1e-5)


def test_evaluate_measures_an_encoder_by_its_embeddings(tokenizer, corpus):
    original = tiny_bert()
    int8 = ampq.quantize(tiny_bert(), "int8-ch", progress=False)
    int3 = ampq.quantize(tiny_bert(), "int3-g32", progress=False)
    [result] = ampq.evaluate({"int8": int8, "int3": int3}, original, text=ampq.Text(corpus, 150, 48),
                             tokenizer=tokenizer, progress=False)
    q8, q3 = result.models["int8"], result.models["int3"]
    assert q8.texts == 150 and q8.max_tokens == 48
    assert q8.cosine >= 0.999 and q8.cosine_min > 0.99
    assert q3.cosine < q8.cosine and q3.neighbours <= q8.neighbours
    assert result.reference.cosine == pytest.approx(1.0)


def test_evaluate_refuses_an_encoder_without_its_original_and_mixed_kinds(tokenizer, corpus):
    from tests.test_model_io import tiny_llama

    with pytest.raises(AmpqError, match="against its original"):
        ampq.evaluate(tiny_bert(), None, text=ampq.Text(corpus, 20, 32), tokenizer=tokenizer)
    with pytest.raises(AmpqError, match="one kind"):
        ampq.evaluate({"bert": tiny_bert()}, tiny_llama(), text="wiki", tokenizer=tokenizer)
    with pytest.raises(AmpqError, match="texts, not token windows"):
        ampq.evaluate(tiny_bert(), tiny_bert(), text=IDS, tokenizer=tokenizer)


def test_gptq_and_a_budget_quantize_an_encoder(tmp_path):
    calib = torch.randint(5, 5 + len(WORDS), (8, 32), generator=torch.Generator().manual_seed(2))
    gptq = ampq.quantize(tiny_bert(), ampq.get_scheme("gptq"), calibration=calib, progress=False)
    assert isinstance(gptq.encoder.layer[0].attention.self.query, QuantLinear)
    budget = ampq.Budget(bits=4.5, candidates=["int3-g32:gptq", "int4-g32:gptq", "int8-ch:rtn"],
                         sensitivity=str(tmp_path / "table.json"))
    model = ampq.quantize(tiny_bert(), budget, calibration=calib, output=tmp_path / "q", progress=False)
    formats = {m.format_name for m in model.modules() if isinstance(m, QuantLinear)}
    assert len(formats) > 1  # the allocation mixed formats within the budget
    assert ampq.report.linear_bits(model) <= 4.5 + 1e-6
    assert torch.equal(hidden(ampq.load(tmp_path / "q")), hidden(model))


def test_encoder_fisher_weights_predict_the_change_of_the_last_hidden_state():
    """The random-projection Fisher estimate against the measured 1/2 |dh|^2 per token, layer by
    layer: the ranking across layers is what the allocation uses."""
    from ampq.calibrate import Calibration
    from ampq.fisher import fisher_damage, output_fisher
    from ampq.report import block_linear_names
    from ampq.sensitivity import row_errors

    model = tiny_bert()
    tokens = torch.randint(5, 5 + len(WORDS), (16, 32), generator=torch.Generator().manual_seed(3))
    names = block_linear_names(model)
    fisher = output_fisher(model, tokens, names, batch_size=4, progress=False)
    with torch.no_grad():
        base = model(tokens).last_hidden_state
    cal = Calibration(model, tokens)
    estimated, measured = [], []
    for prefix, block in cal.blocks:
        groups = cal.groups(block)
        stats = cal.stats_and_advance(block, groups)
        for group in groups:
            for sub in group:
                linear = block.get_submodule(sub)
                w = linear.weight.detach().clone()
                noise = 0.05 * w.abs().mean() * torch.randn(w.shape, generator=torch.Generator().manual_seed(4))
                estimated.append(fisher_damage(row_errors(w, w + noise, stats[group[0]].hessian),
                                               fisher[f"{prefix}.{sub}"]))
                with torch.no_grad():
                    linear.weight.add_(noise)
                    measured.append(0.5 * float((model(tokens).last_hidden_state - base).pow(2).sum(-1).mean()))
                    linear.weight.copy_(w)
    est, meas = torch.tensor(estimated), torch.tensor(measured)
    rank = lambda t: t.argsort().argsort().float()  # noqa: E731
    assert torch.corrcoef(torch.stack([rank(est), rank(meas)]))[0, 1] > 0.8
    assert 0.2 < float(est.sum() / meas.sum()) < 5  # the same unit, not only the same order


def test_cli_quantize_eval_and_eval_pick_the_embedding_measure(tmp_path, tokenizer, corpus, capsys):
    float_dir = tmp_path / "float"
    tiny_bert().save_pretrained(float_dir)
    tokenizer.save_pretrained(float_dir)
    out = tmp_path / "q"
    assert main(["quantize", str(float_dir), "-f", "int8-ch", "-o", str(out), "--eval", "--corpus", corpus,
                 "--windows", "50", "--json", str(tmp_path / "r.json")]) == 0
    printed = capsys.readouterr().out
    assert "cosine" in printed and "same nearest" in printed and "ppl" not in printed
    result = json.loads((tmp_path / "r.json").read_text())["results"][0]["model"]
    assert result["cosine"] >= 0.999 and result["texts"] == 50
    assert main(["eval", str(out), "--corpus", corpus, "--windows", "50"]) == 0
    assert "cosine" in capsys.readouterr().out


def test_cli_refuses_what_an_encoder_cannot_do(tmp_path, tokenizer, corpus, capsys):
    ampq.save(ampq.quantize(tiny_bert(), "int8-ch", progress=False), tmp_path / "q", tokenizer)
    assert main(["eval", str(tmp_path / "q"), "--corpus", corpus]) == 2
    assert "against its original" in capsys.readouterr().err
    assert main(["generate", str(tmp_path / "q"), "--prompt", "the river"]) == 2
    assert "is an encoder (BertModel)" in capsys.readouterr().err
    assert main(["bench", str(tmp_path / "q")]) == 2
    assert "does not generate" in capsys.readouterr().err


# ---- block structures ----------------------------------------------------------------------------
def test_an_encoder_decoder_is_refused_naming_its_stacks():
    from transformers import T5Config, T5ForConditionalGeneration

    t5 = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                                             vocab_size=100))
    with pytest.raises(AmpqError, match=r"2 stacks of blocks \(.*encoder\.block: 2 blocks.*not supported"):
        ampq.quantize(t5, "int8-ch", progress=False)
    assert not any(isinstance(m, QuantLinear) for m in t5.modules())  # refused before any change


def test_a_model_without_a_stack_of_blocks_is_refused():
    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = BertConfig()
            self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    with pytest.raises(AmpqError, match="found no decoder blocks.*Mlp"):
        ampq.quantize(Mlp(), "int8-ch", progress=False)


def tiny_qwen2_vl():
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    # the vision tower made larger than the language model: the choice must not go by size
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, bos_token_id=1, eos_token_id=2,
                         rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
        vision_config=dict(depth=3, embed_dim=96, hidden_size=64, num_heads=4, mlp_ratio=4, in_channels=3,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    cfg = LlavaConfig(text_config=dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, vocab_size=512),
                      vision_config=dict(model_type="clip_vision_model", hidden_size=96, intermediate_size=384,
                                         num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14),
                      image_token_index=511)
    return LlavaForConditionalGeneration(cfg).eval()


@pytest.mark.parametrize("make, tower", [(tiny_qwen2_vl, "model.visual"), (tiny_llava, "model.vision_tower")])
def test_a_vision_language_model_quantizes_its_language_model_and_keeps_the_vision_tower(tmp_path, make, tower):
    from ampq.models import kept_towers

    model = make()
    vision = sum(p.numel() for p in model.get_submodule(tower).parameters())
    text = sum(p.numel() for p in model.get_decoder().layers.parameters())
    assert vision > text
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    ampq.quantize(model, "int8-ch", progress=False)
    assert tower in kept_towers(model)
    quantized = [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]
    assert quantized and all(".language_model.layers." in n for n in quantized)
    assert all(isinstance(m, nn.Linear) for m in model.get_submodule(tower).modules() if hasattr(m, "in_features"))
    assert isinstance(model.lm_head, nn.Linear)
    assert tower in model.ampq_manifest["kept_towers"]
    from ampq.coverage import coverage

    assert tower.rpartition(".")[2] in coverage(model).kept  # the summary line names the tower it kept
    ampq.save(model, tmp_path / "q")
    loaded = ampq.load(tmp_path / "q")
    assert type(loaded) is type(model)
    with torch.no_grad():
        assert torch.equal(loaded(ids, use_cache=False).logits, model(ids, use_cache=False).logits)
    for name, p in model.get_submodule(tower).named_parameters():
        assert torch.equal(loaded.get_submodule(tower).get_parameter(name), p)


# ---- the real sentence-embedding model -----------------------------------------------------------
@pytest.fixture(scope="module")
def minilm():
    return ampq.load_model("all-minilm-l6-v2")


@pytest.mark.slow
def test_real_minilm_int8_keeps_its_embeddings_and_4_bits_is_reported(minilm, tmp_path):
    import copy

    original, tok = minilm
    assert type(original) is BertModel
    int8 = ampq.quantize(copy.deepcopy(original), "int8-ch", progress=False, output=tmp_path / "q8", tokenizer=tok)
    int4 = ampq.quantize(copy.deepcopy(original), "int4-g128", progress=False)
    text = ampq.Text("wiki", 128, 128)
    [r] = ampq.evaluate({"int8": int8, "int4": int4}, original, text=text, tokenizer=tok, progress=False)
    print(f"all-minilm-l6-v2 on {r.models['int8'].texts} wiki texts: int8-ch cosine {r.models['int8'].cosine:.5f}, "
          f"int4-g128 cosine {r.models['int4'].cosine:.5f} (same nearest {r.models['int4'].neighbours:.3f})")
    assert r.models["int8"].cosine >= 0.999 and r.models["int8"].neighbours >= 0.95
    assert r.models["int4"].cosine < r.models["int8"].cosine
    loaded = ampq.load(tmp_path / "q8")
    texts = ["A ship sank in the harbour.", "The city council met on Tuesday."]
    assert torch.equal(embed(loaded, tok, texts), embed(int8, tok, texts))
