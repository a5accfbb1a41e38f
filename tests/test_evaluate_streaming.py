"""The streaming evaluation: the figures of a whole-batch computation, nothing kept per window,
each quantized weight decoded once per evaluation and freed after."""

import gc
import importlib
import math
import weakref

import pytest
import torch

import ampq
from ampq import AmpqError, kernels
from ampq.data import Windows
from ampq.evaluation import Reference, evaluate
from ampq.nn import QuantLinear
from test_model_io import tiny_llama

# the module, whatever the package exports under the name evaluate
evaluation = importlib.import_module("ampq.evaluation")


def _windows(n: int, window: int = 48, stride: int = 32) -> Windows:
    tokens = torch.randint(0, 256, (n, window), generator=torch.Generator().manual_seed(n))
    return Windows(tokens, [0] + [window - stride] * (n - 1), window, stride, "random")


def _quantized():
    return ampq.quantize(tiny_llama(seed=0), "int4-g32", progress=False)


@torch.inference_mode()
def _whole(model, original, windows: Windows) -> tuple[float, float, float, float]:
    """Perplexity, KL, top-1 and the original's perplexity from every window's log-probabilities at
    once, on the reference kernel: the computation the streaming evaluation replaces."""
    with kernels.use("reference"):
        lp = torch.log_softmax(model(windows.tokens, use_cache=False).logits.float(), -1)
        ref = torch.log_softmax(original(windows.tokens, use_cache=False).logits.float(), -1)
    nll = ref_nll = kl = agree = count = 0.0
    for i, first in enumerate(windows.first_scored):
        lo = max(first, 1)
        target, p, r = windows.tokens[i, lo:, None], lp[i, lo - 1:-1], ref[i, lo - 1:-1]
        nll -= p.gather(-1, target).sum().item()
        ref_nll -= r.gather(-1, target).sum().item()
        kl += (r.exp() * (r - p)).sum().item()
        agree += (r.argmax(-1) == p.argmax(-1)).sum().item()
        count += target.numel()
    return math.exp(nll / count), kl / count, agree / count, math.exp(ref_nll / count)


@pytest.mark.parametrize("decode_once", [True, False])
def test_streaming_figures_match_the_whole_batch_computation(monkeypatch, decode_once):
    # batches of 2 windows over 5 (the last one short) and scoring slices of 7 positions, so every
    # boundary is crossed
    monkeypatch.setattr(evaluation, "BATCH_LOGITS_BYTES", 2 * 48 * 256 * 4)
    monkeypatch.setattr(evaluation, "SLICE_BYTES", 7 * 256 * 4)
    model, original, windows = _quantized(), tiny_llama(seed=0), _windows(5)
    reference = Reference(original, windows)
    q = evaluate(model, windows, reference, progress=False, decode_once=decode_once)
    ppl, kl, top1, ref_ppl = _whole(model, original, windows)
    assert q.tokens == windows.scored_tokens
    assert q.perplexity == pytest.approx(ppl, rel=1e-5) and q.kl == pytest.approx(kl, rel=1e-4)
    assert q.top1 == pytest.approx(top1, abs=0.5 / q.tokens)
    assert reference.quality.perplexity == pytest.approx(ref_ppl, rel=1e-5) and q.kl > 0


def test_nothing_is_kept_per_window(monkeypatch):
    """The tensors alive at the start of each batch are as many at the last batch as at the first."""
    monkeypatch.setattr(evaluation, "BATCH_LOGITS_BYTES", 1)  # one window per batch
    model, original, windows = _quantized(), tiny_llama(seed=0), _windows(8)
    alive: list[int] = []
    logits = evaluation._logits

    def counting(m, tokens):
        if m is model:
            gc.collect()
            alive.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)))
        return logits(m, tokens)

    monkeypatch.setattr(evaluation, "_logits", counting)
    reference = Reference(original, windows)
    evaluate(model, windows, reference, progress=False)
    assert len(alive) == 8 and alive[-1] == alive[1], alive
    assert set(vars(reference)) == {"model", "windows", "quality"}


def test_each_weight_is_decoded_once_per_evaluation_and_freed_after(monkeypatch):
    monkeypatch.setattr(evaluation, "BATCH_LOGITS_BYTES", 1)
    model, windows = _quantized(), _windows(4)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    decoded: list[weakref.ref] = []
    dequantize = QuantLinear.dequantize

    def counting(self, dtype=torch.float32):
        w = dequantize(self, dtype)
        decoded.append(weakref.ref(w))
        return w

    monkeypatch.setattr(QuantLinear, "dequantize", counting)
    evaluate(model, windows, progress=False)
    assert len(decoded) == len(layers)
    gc.collect()
    assert all(ref() is None for ref in decoded)
    decoded.clear()
    evaluate(model, windows, progress=False, decode_once=False)
    assert len(decoded) == 4 * len(layers)


def test_decoded_weights_that_do_not_fit_are_decoded_on_every_call(monkeypatch):
    monkeypatch.setattr("ampq.decode_once.free_bytes", lambda device: 0)
    model, original, windows = _quantized(), tiny_llama(seed=0), _windows(3)
    expected = evaluate(model, windows, Reference(original, windows), progress=False, decode_once=False)
    with pytest.warns(UserWarning, match="decoded on every call") as told:
        q = evaluate(model, windows, Reference(original, windows), progress=False)
    assert q == expected and "\n" not in str(told[0].message)


def test_reference_for_other_windows_is_refused():
    model, windows = tiny_llama(), _windows(3)
    with pytest.raises(AmpqError, match="other windows") as e:
        evaluate(model, _windows(2), Reference(model, windows), progress=False)
    assert "\n" not in str(e.value)


def test_models_evaluated_together_give_their_own_figures_with_one_reference_pass(monkeypatch):
    monkeypatch.setattr(evaluation, "BATCH_LOGITS_BYTES", 2 * 48 * 256 * 4)  # batches of 2 windows over 5
    original, windows = tiny_llama(seed=0), _windows(5)
    models = {"int4": _quantized(), "int8": ampq.quantize(tiny_llama(seed=0), "int8-ch", progress=False)}
    alone = {name: evaluate(m, windows, Reference(original, windows), progress=False) for name, m in models.items()}
    calls = {id(m): 0 for m in [original, *models.values()]}
    logits = evaluation._logits

    def counting(m, tokens):
        calls[id(m)] += 1
        return logits(m, tokens)

    monkeypatch.setattr(evaluation, "_logits", counting)
    reference = Reference(original, windows)
    together = evaluation.evaluate_all(models, windows, reference, progress=False)
    assert together == alone and together["int4"] != together["int8"]
    assert set(calls.values()) == {3} and reference.quality.perplexity > 1
