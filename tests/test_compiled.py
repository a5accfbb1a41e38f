"""The compiled decoding loop (ampq.compile): quantized layers trace whole, and the compiled step
decodes what eager decoding decodes."""

import pytest
import torch

import ampq
from ampq.compiled import compile as compile_decoder
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.kernels import prepare
from ampq.nested import NestedLinear, nest
from ampq.nn import QuantLinear, quantized_linears
from test_model_io import tiny_llama

IDS = torch.randint(0, 256, (1, 9), generator=torch.Generator().manual_seed(3))


def _layer(fmt: str, bias: bool = False) -> QuantLinear:
    torch.manual_seed(0)
    linear = torch.nn.Linear(128, 64, bias=bias)
    codes, params = get_format(fmt).quantize_codes(linear.weight.detach())
    return QuantLinear.from_linear(linear, fmt, codes, params)


# one format per CPU kernel: packed int4 and int8, the planes (NF4, FP8), 16-bit as stored, and the
# compute dtype path (bitsandbytes' bf16 compute)
@pytest.mark.parametrize("fmt", ["int4-g32", "int8-ch", "nf4-b64", "fp8-e4m3-ch", "bf16"])
def test_quantized_linear_traces_whole_and_matches_eager(fmt):
    layer = _layer(fmt, bias=True)
    x = torch.randn(1, 1, 128)
    with torch.inference_mode():
        prepare(layer, 1)
        explained = torch._dynamo.explain(layer)(x)
        assert explained.graph_break_count == 0, explained.break_reasons
        traced = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
        assert torch.equal(traced, layer(x))


def test_nested_linear_traces_whole_at_every_level():
    torch.manual_seed(0)
    weight = torch.randn(64, 128)
    base = _layer("int4-g32")
    layer = NestedLinear(base, ["int4-g32-sym"], nest(base, weight, ["int4-g32-sym"]))
    x = torch.randn(1, 1, 128)
    with torch.inference_mode():
        for level in (1, 0):
            layer.set_level(level)
            for m in layer.modules():
                if isinstance(m, QuantLinear):
                    prepare(m, 1)
            explained = torch._dynamo.explain(layer)(x)
            assert explained.graph_break_count == 0, explained.break_reasons
            assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


def test_an_unprepared_layer_is_refused_when_traced():
    layer = _layer("int4-g32")
    with pytest.raises(Exception, match="without its kernel prepared"):
        torch.compile(layer, fullgraph=True, backend="eager")(torch.randn(1, 128))


def _eager_greedy(model, ids, new_tokens):
    """Eager decoding with transformers' dynamic cache: (tokens, logits of each step)."""
    tokens, logits = [], []
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        for _ in range(new_tokens):
            step = out.logits[:, -1]
            token = step.argmax(-1, keepdim=True)
            tokens.append(token)
            logits.append(step)
            out = model(token, cache=out.cache, use_cache=True)
    return torch.cat(tokens, 1), torch.stack(logits, 1)


def _varied_model(fmt="int4-g32"):
    """A tiny quantized Llama whose greedy tokens vary (at the initialisation's scale it repeats one
    token, which would make the comparisons below weak)."""
    model = tiny_llama(seed=5)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(10)
    return ampq.quantize(model, fmt, progress=False)


def test_compiled_decoding_equals_eager_decoding():
    model = _varied_model()
    tokens, logits = _eager_greedy(model, IDS, 12)
    assert len(set(tokens[0].tolist())) > 3  # the comparison below is not of one repeated token
    decoder = compile_decoder(model, max_len=24)
    # grouped-query attention (2 key/value heads for 4) without the KV cache repeated in the step
    assert model.config._attn_implementation == "ampq_sdpa" and model.model.layers[0].self_attn.num_key_value_groups == 2
    assert torch.equal(decoder.generate(IDS, 12), tokens)
    assert len(decoder.capture_seconds) == 1  # captured once: the second generation reuses it
    with torch.inference_mode():
        got = [decoder.prefill(IDS)]
        for t in tokens[0, :-1]:
            got.append(decoder.step(t.view(1, 1)))
    got = torch.stack(got, 1)
    # the same kernels on the same bf16-rounded activations; what differs is the order of float32
    # sums inductor fuses (norms, softmax): a few units of float32 roundoff per op, over 2 blocks
    torch.testing.assert_close(got, logits, rtol=1e-4, atol=1e-4)
    assert decoder.capture_seconds == decoder.capture_seconds[:1]
    with pytest.raises(AmpqError, match="static KV cache"):
        decoder.generate(IDS, 20)


def test_a_precision_switch_is_captured_again():
    model = _varied_model()
    name, base = next(iter(quantized_linears(model).items()))
    weight = torch.randn(base.out_features, base.in_features) * 0.2
    nested = NestedLinear(base, ["int4-g32-sym"], nest(base, weight, ["int4-g32-sym"]))
    parent = model.get_submodule(name.rpartition(".")[0])
    setattr(parent, name.rpartition(".")[2], nested)
    decoder = compile_decoder(model, max_len=16)
    decoder.generate(IDS, 3)
    nested.set_level(0)  # as ampq.adapt does
    got = decoder.generate(IDS, 3)
    assert len(decoder.capture_seconds) == 2
    assert torch.equal(got, _eager_greedy(model, IDS, 3)[0])


def test_bench_cli_compiled(tmp_path):
    import json

    from ampq.cli import main

    ampq.save(_varied_model("int8-ch"), tmp_path / "m")
    out = tmp_path / "b.json"
    assert main(["bench", str(tmp_path / "m"), "--compile", "--batch", "1", "--prompt-tokens", "8", "--new-tokens", "3",
                 "--repeats", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["compiled"] is True
    assert result["rows"][0]["compile_seconds"] > 0 and result["rows"][0]["decode_tokens_per_s"] > 0


@pytest.mark.parametrize("cpp_wrapper", [False, True])
def test_a_switchable_decoder_switches_without_a_capture(cpp_wrapper):
    """switchable=True: each adaptive layer is one opaque op in the compiled step, so switching down
    and back up decodes as eager decoding does at each level, with the one capture of the start."""
    model = _varied_model()
    nested = []
    for name, base in list(quantized_linears(model).items())[:4]:
        weight = torch.randn(base.out_features, base.in_features) * 0.2
        layer = NestedLinear(base, ["int4-g32-sym"], nest(base, weight, ["int4-g32-sym"]))
        parent = model.get_submodule(name.rpartition(".")[0])
        setattr(parent, name.rpartition(".")[2], layer)
        nested.append(layer)
    decoder = compile_decoder(model, max_len=16, switchable=True, cpp_wrapper=cpp_wrapper)
    steps = []
    for level in (1, 0, 1):
        for layer in nested:
            layer.set_level(level)
        assert torch.equal(decoder.generate(IDS, 4), _eager_greedy(model, IDS, 4)[0]), level
        with torch.inference_mode():
            decoder.prefill(IDS)
            steps.append(decoder.step(IDS[:, -1:]))
    assert not torch.equal(steps[0], steps[1]) and torch.equal(steps[0], steps[2])  # the switch took effect
    assert len(decoder.capture_seconds) == 1
    assert torch.equal(decoder.generate(IDS, 4), _eager_greedy(model, IDS, 4)[0])


def test_the_grouped_query_attention_is_transformers_sdpa_without_the_copies(monkeypatch):
    from transformers.integrations import sdpa_attention

    from ampq.attention import gqa_sdpa_forward, use_gqa_attention

    model = _varied_model()
    with torch.inference_mode():
        full = model(IDS).logits
    assert use_gqa_attention(model) and use_gqa_attention(model)  # twice: already on
    with torch.inference_mode():
        torch.testing.assert_close(model(IDS).logits, full, rtol=1e-5, atol=1e-5)
    # one query over a masked cache, as a traced decoding step sees it: transformers repeats the
    # key/value heads (a copy of the cache), this attention does not, and both give the same output
    attn = model.model.layers[0].self_attn
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, h, n, 24, generator=gen) for h, n in ((4, 1), (2, 16), (2, 16)))
    mask = torch.arange(16).view(1, 1, 1, 16) < 11
    repeats = []
    repeat_kv = sdpa_attention.repeat_kv
    monkeypatch.setattr(sdpa_attention, "repeat_kv", lambda x, n: repeats.append(n) or repeat_kv(x, n))
    monkeypatch.setattr(sdpa_attention, "is_torchdynamo_compiling", lambda: True)
    want, _ = sdpa_attention.sdpa_attention_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert repeats == [2, 2]
    got, _ = gqa_sdpa_forward(attn, q, k, v, mask, scaling=attn.scaling)
    assert repeats == [2, 2] and got.shape == want.shape == (1, 1, 4, 24)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
