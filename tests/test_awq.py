import copy

import pytest
import torch
from torch import nn

from ampq.algorithms import awq
from ampq.algorithms.awq import awq_block, scales
from ampq.calibrate import Calibration
from ampq.data import make_windows
from ampq.nn import QuantLinear
from ampq.models import replace_module as _replace
from ampq.pipeline.blockwise import quantize_linear


def linears(block):
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}


def quantized_copy(block, fmt):
    block = copy.deepcopy(block)
    for name, m in linears(block).items():
        _replace(block, name, quantize_linear(name, m, fmt))
    return block


@torch.no_grad()
def rel_error(cal, block, ref_block):
    """Error of the block's output relative to what the reference block adds to its input."""
    num = den = 0.0
    for i, x in enumerate(cal.inputs):
        ref = cal._run(ref_block, i)
        num += float((cal._run(block, i) - ref).pow(2).sum())
        den += float((ref - x).pow(2).sum())
    return (num / den) ** 0.5


@torch.no_grad()
def mse(cal, block, ref_block):
    return sum(float((cal._run(block, i) - cal._run(ref_block, i)).pow(2).mean()) for i in range(len(cal.inputs)))


@pytest.fixture
def fixed_alpha(monkeypatch):
    """Skip the search and fold s = mag^0.5, so that every fold really changes weights."""
    monkeypatch.setattr(awq, "_search", lambda block, q, mag, xtx, grid, duo: [(0.5, scales(mag, 0.5)), (0.0, torch.ones_like(mag))])
    monkeypatch.setattr(awq, "_refine", lambda block, cal, parent, q, candidates: candidates[0])


@pytest.fixture(scope="module")
def real(smollm2):
    """Block inputs of the real model on calibration and held-out windows, for blocks 0..4."""
    model, tok = smollm2
    cal = Calibration(model, make_windows(tok, "wiki", "calib", 128, 8).tokens, batch_size=4)
    ev = Calibration(model, make_windows(tok, "wiki", "eval", 128, 4).tokens)
    at = {}
    for i in range(5):
        at[i] = (copy.copy(cal), copy.copy(ev))
        cal.advance(cal.blocks[i][1])
        ev.advance(ev.blocks[i][1])
    return at


def tiny_model(arch, kv_heads=2):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4,
                                             num_key_value_heads=kv_heads, max_position_embeddings=64))
    else:
        model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                                 num_hidden_layers=2, num_attention_heads=4,
                                                 max_position_embeddings=64))
    model.eval().requires_grad_(False)
    with torch.no_grad():  # norms at 1 (and bias 0) would hide a missing fold into them
        for m in model.modules():
            if not isinstance(m, nn.Linear) and getattr(m, "weight", None) is not None and m.weight.dim() == 1:
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.uniform_(-0.5, 0.5)
    cal = Calibration(model, torch.randint(0, 64, (4, 16)), batch_size=2)
    return cal, cal.blocks[0][1]


def test_fold_preserves_real_block_and_quantlinear_divides_by_explicit_scale(real, fixed_alpha):
    cal, ev = real[0]
    block = cal.blocks[0][1]
    folded = copy.deepcopy(block)
    awq_block(folded, cal, dict.fromkeys(linears(block), "int4-g64"))
    assert rel_error(ev, folded, block) < 1e-5
    assert rel_error(cal, folded, block) < 1e-5
    # smollm2 has grouped-query attention: o_proj's scale stays explicit, everything else folds
    assert {n for n, m in linears(folded).items() if hasattr(m, "input_scale")} == {"self_attn.o_proj"}
    for name in ("input_layernorm", "post_attention_layernorm", "mlp.up_proj"):
        assert not torch.allclose(folded.get_submodule(name).weight, block.get_submodule(name).weight)
    scale = folded.self_attn.o_proj.input_scale
    assert scale.dtype == torch.float32 and scale.shape == (576,) and scale.std() > 0.05

    layer = quantize_linear("o_proj", folded.self_attn.o_proj, "int8-ch")
    assert isinstance(layer, QuantLinear) and torch.equal(layer.input_scale, scale)
    x = torch.randn(64, 576) * scale  # inputs shaped like the real ones: big where s is big
    want = block.self_attn.o_proj(x)
    err = float((layer(x) - want).norm() / want.norm())
    assert err < 0.02
    layer.input_scale = None
    assert float((layer(x) - want).norm() / want.norm()) > 10 * err
    # the whole block in int8 stays close to the float block
    assert rel_error(ev, quantized_copy(folded, "int8-ch"), block) < 0.05


@pytest.mark.parametrize("kv_heads", [2, 4])
def test_fold_preserves_tiny_llama(kv_heads, fixed_alpha):
    cal, block = tiny_model("llama", kv_heads)
    folded = copy.deepcopy(block)
    awq_block(folded, cal, dict.fromkeys(linears(block), "int4-g16"))
    assert rel_error(cal, folded, block) < 1e-5
    explicit = {n for n, m in linears(folded).items() if hasattr(m, "input_scale")}
    # without GQA, v_proj's output rows take o_proj's scale
    assert explicit == ({"self_attn.o_proj"} if kv_heads == 2 else set())
    # q/k/v's fold scales v_proj's columns alike in every row; o_proj's fold scales its rows apart
    ratio = folded.self_attn.v_proj.weight / block.self_attn.v_proj.weight
    assert bool(ratio.std(0).max() > 0.01) == (kv_heads == 4)
    assert rel_error(cal, quantized_copy(folded, "int8-ch"), block) < 0.05


def test_fold_gpt_neox(fixed_alpha):
    cal, block = tiny_model("neox")
    folded = copy.deepcopy(block)
    awq_block(folded, cal, dict.fromkeys(linears(block), "int4-g16"))
    assert rel_error(cal, folded, block) < 1e-5
    explicit = {n for n, m in linears(folded).items() if hasattr(m, "input_scale")}
    assert explicit == {"attention.dense", "mlp.dense_4h_to_h"}
    for norm in ("input_layernorm", "post_attention_layernorm"):  # LayerNorm: weight and bias
        for key in ("weight", "bias"):
            assert not torch.allclose(getattr(getattr(folded, norm), key), getattr(getattr(block, norm), key))
    assert rel_error(cal, quantized_copy(folded, "int8-ch"), block) < 0.05


def test_unknown_architecture_keeps_every_scale_explicit(monkeypatch, fixed_alpha):
    monkeypatch.setattr(awq, "PREVIOUS", {})
    cal, block = tiny_model("llama", 2)
    formats = dict.fromkeys(linears(block), "int4-g16")
    folded = copy.deepcopy(block)
    awq_block(folded, cal, formats)
    assert rel_error(cal, folded, block) < 1e-5
    assert {n for n, m in linears(folded).items() if hasattr(m, "input_scale")} == set(formats)
    assert torch.equal(folded.input_layernorm.weight, block.input_layernorm.weight)
    assert cal.groups(folded) == cal.groups(block)  # the explicit scales leave q/k/v one group
    assert rel_error(cal, quantized_copy(folded, "int8-ch"), block) < 0.05
    # a layer left unquantized keeps its weight and gets no scale
    del formats["self_attn.k_proj"]
    partial = copy.deepcopy(block)
    awq_block(partial, cal, formats)
    assert rel_error(cal, partial, block) < 1e-5
    assert torch.equal(partial.self_attn.k_proj.weight, block.self_attn.k_proj.weight)
    assert not hasattr(partial.self_attn.k_proj, "input_scale")


def test_wrong_table_entry_is_caught(monkeypatch, fixed_alpha):
    """gate_proj goes through SiLU before reaching down_proj: folding there would change the block."""
    monkeypatch.setitem(awq.PREVIOUS, "mlp.down_proj", ("mlp.gate_proj",))
    cal, block = tiny_model("llama", 4)
    folded = copy.deepcopy(block)
    awq_block(folded, cal, dict.fromkeys(linears(block), "int4-g16"))
    assert rel_error(cal, folded, block) < 1e-5
    ratio = folded.mlp.gate_proj.weight / block.mlp.gate_proj.weight  # only gate/up's column scale
    assert ratio.std(0).max() < 1e-5
    assert hasattr(folded.mlp.down_proj, "input_scale")


@pytest.mark.parametrize("index,fmt", [(2, "int4-g64"), (4, "int3-g64")])
def test_awq_beats_rtn_on_held_out_windows(real, index, fmt):
    cal, ev = real[index]
    block = cal.blocks[index][1]
    scaled = copy.deepcopy(block)
    alphas = awq_block(scaled, cal, dict.fromkeys(linears(block), fmt))
    assert any(a > 0 for a in alphas.values())
    rtn, ours = mse(ev, quantized_copy(block, fmt), block), mse(ev, quantized_copy(scaled, fmt), block)
    print(f"block {index} {fmt}: RTN {rtn:.4g}, AWQ {ours:.4g} ({ours / rtn:.2f}x), alphas {alphas}")
    assert ours < 0.85 * rtn


def test_alpha_grid_starts_at_zero():
    cal, block = tiny_model("llama", 2)
    formats = dict.fromkeys(linears(block), "int3-g16")
    alphas = awq_block(copy.deepcopy(block), cal, formats)
    assert list(alphas) == [",".join(g) for g in cal.groups(block)]
    assert all(0 <= a < 1 and abs(a * 20 - round(a * 20)) < 1e-9 for a in alphas.values())
    # a grid of one point is alpha = 0 alone: s = 1, plain RTN, nothing changes
    same = copy.deepcopy(block)
    assert set(awq_block(same, cal, formats, grid=1).values()) == {0.0}
    for (name, p), q in zip(block.named_parameters(), same.parameters()):
        assert torch.equal(p, q), name
    assert torch.equal(same.self_attn.o_proj.input_scale, torch.ones(32))
    assert torch.equal(scales(torch.tensor([0.0, 1e-3, 5.0]), 0.0), torch.ones(3))
    assert torch.isfinite(scales(torch.tensor([0.0, 1e-3, 5.0]), 0.9)).all()


def test_refine_tells_candidates_apart_by_their_scales_not_their_alpha():
    # with and without duo scaling the same alpha gives two different s: both must be tried
    cal, block = tiny_model("llama", 2)
    quantized = {"mlp.gate_proj": "int3-g16", "mlp.up_proj": "int3-g16"}
    torch.manual_seed(1)
    wrecking = torch.rand(32) * 1e3 + 1e-3  # spreads each group over six decades: most weights round to 0
    plain = torch.ones(32)
    alpha, s = awq._refine(block, cal, "mlp", quantized, [(0.5, wrecking), (0.5, plain)])
    assert s is plain
