import math

import pytest
import torch

from ampq import AmpqError
from ampq.data import Windows, make_windows, read_text, split_text
from ampq.evaluation import Reference, evaluate
from test_model_io import tiny_llama


class WordTokenizer:
    """One token per word: enough to check window arithmetic without a real vocabulary."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [hash(w) % 200 for w in text.split()]}


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "t.txt"
    p.write_text('<doc id="1" title="x">\n' + " ".join(f"w{i}" for i in range(4000)) + "\n</doc>\n")
    return p


def test_doc_tags_are_stripped_and_halves_do_not_overlap(text_file):
    text = read_text(str(text_file))
    assert "<doc" not in text and "</doc>" not in text
    calib, held = split_text(text, "calib"), split_text(text, "eval")
    assert calib + held == text and not set(calib.split()[:-1]) & set(held.split()[1:])


def test_windows_and_strides(text_file):
    w = make_windows(WordTokenizer(), str(text_file), "eval", window=64, n=5)
    assert w.tokens.shape == (5, 64) and w.first_scored == [0, 0, 0, 0, 0]
    s = make_windows(WordTokenizer(), str(text_file), "eval", window=64, n=5, stride=16)
    assert torch.equal(s.tokens[1, :48], s.tokens[0, 16:])
    assert s.first_scored == [0, 48, 48, 48, 48] and s.scored_tokens == 63 + 4 * 16


def test_too_short_text_and_missing_file(tmp_path, text_file):
    with pytest.raises(AmpqError, match="fewer than one window"):
        make_windows(WordTokenizer(), str(text_file), "eval", window=5000, n=1)
    with pytest.raises(AmpqError, match="no text"):
        read_text(str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe abc")
    with pytest.raises(AmpqError, match="not UTF-8"):
        read_text(str(bad))


def test_perplexity_matches_transformers_loss():
    model = tiny_llama()
    tokens = torch.randint(0, 256, (3, 32), generator=torch.Generator().manual_seed(0))
    windows = Windows(tokens, [0, 0, 0], 32, 32, "random")
    with torch.no_grad():
        loss = model(tokens, labels=tokens).loss.item()
    q = evaluate(model, windows, progress=False)
    assert q.perplexity == pytest.approx(math.exp(loss), rel=1e-5)
    assert q.tokens == 3 * 31 and q.kl is None


def test_kl_is_zero_against_itself_and_positive_against_another():
    a, b = tiny_llama(seed=0), tiny_llama(seed=1)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    windows = Windows(tokens, [0, 0], 16, 16, "random")
    ref = Reference(a, windows)
    same = evaluate(a, windows, ref, progress=False)
    assert same.kl == pytest.approx(0.0, abs=1e-6) and same.top1 == 1.0
    other = evaluate(b, windows, ref, progress=False)
    assert other.kl > 0.01 and other.top1 < 1.0
    assert ref.quality.perplexity == pytest.approx(same.perplexity)


def test_calibration_windows_give_every_hessian_full_rank():
    from torch import nn

    from ampq.data import Text, calibration_windows, sized_for

    narrow = nn.Sequential(nn.Linear(576, 1536), nn.Linear(1536, 576))
    wide = nn.Sequential(nn.Linear(4096, 14336), nn.Linear(14336, 4096))
    assert calibration_windows(narrow) == 32  # the floor
    assert calibration_windows(wide) == 56 and 56 * 512 >= 2 * 14336
    assert calibration_windows(wide, window=2048) == 32
    assert sized_for("mix", wide) == Text("mix", 56, 512)
    assert sized_for(Text("wiki", 8), wide) == Text("wiki", 8)  # a count given is kept
    with pytest.raises(AmpqError, match="how many windows"):
        Text("wiki").cut(None, "calib")


@pytest.mark.parametrize("experts,top_k,windows", [(4, 2, 32), (64, 2, 64), (256, 1, 256)])
def test_calibration_windows_count_the_tokens_an_expert_is_routed(experts, top_k, windows):
    import transformers

    from ampq.data import calibration_windows

    # each expert's gate/up take 512 inputs and see top_k / experts of the tokens: 2 x 512 x experts / top_k
    config = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=512, intermediate_size=64, moe_intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                         num_experts=experts, num_experts_per_tok=top_k)
    model = transformers.Qwen3MoeForCausalLM(config)
    assert calibration_windows(model) == windows  # (4, 2): the floor; (256, 1): the experts' cap

