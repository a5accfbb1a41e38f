"""Quality of a model against its unquantized original: perplexity, KL divergence, top-1 agreement.

The evaluation streams: the models and the original run on one batch of windows at a time and only
running sums are kept, so memory holds the models, the quantized weights decoded once
(:mod:`ampq.decode_once`) and one batch, whatever the number of windows. Several models evaluated
together (:func:`evaluate_all`) share the original's pass over each batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ampq.data import Windows
from ampq.decode_once import decoded_once
from ampq.errors import AmpqError

# bytes of logits one forward pass may return (at least one window runs whatever this says)
BATCH_LOGITS_BYTES = 1 << 27
# bytes of log-probabilities scored at once: the positions of a window are scored in slices
SLICE_BYTES = 1 << 24


@dataclass
class Quality:
    perplexity: float
    kl: float | None  # mean KL(original || model) per scored token, nats
    top1: float | None  # share of scored tokens where both models' most likely token agrees
    tokens: int
    window: int
    stride: int
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


class Reference:
    """The original model to compare with on ``windows``: it runs beside the evaluated model, batch
    by batch, and keeps nothing between evaluations but ``quality``, its own figures on the windows
    (set by the first evaluation against it)."""

    def __init__(self, model: nn.Module, windows: Windows):
        self.model, self.windows = model, windows
        self.quality: Quality | None = None


class _Sums:
    """The running sums over scored tokens, in float64 (each slice's sum is a float32 one)."""

    def __init__(self):
        self.nll = self.ref_nll = self.kl = 0.0
        self.agree = self.count = 0

    def add(self, logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None) -> None:
        lp = torch.log_softmax(logits.float(), dim=-1)
        self.nll -= lp.gather(-1, targets[:, None]).sum().item()
        self.count += targets.numel()
        if ref_logits is not None:
            ref = torch.log_softmax(ref_logits.float(), dim=-1)
            self.ref_nll -= ref.gather(-1, targets[:, None]).sum().item()
            # sum of exp(ref) * (ref - lp): KL(original || model) over the slice
            self.kl += F.kl_div(lp, ref, reduction="sum", log_target=True).item()
            self.agree += (ref.argmax(-1) == lp.argmax(-1)).sum().item()


def _same(a: Windows, b: Windows) -> bool:
    return a.first_scored == b.first_scored and torch.equal(a.tokens, b.tokens)


def _logits(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    return model(tokens.to(device), use_cache=False).logits


def _vocab(model: nn.Module) -> int:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head.weight.shape[0] if head is not None and hasattr(head, "weight") else 32000


def _batch_size(windows: Windows, vocab: int) -> int:
    return max(1, min(len(windows.tokens), BATCH_LOGITS_BYTES // (windows.window * vocab * 4)))


def evaluate(model: nn.Module, windows: Windows, reference: Reference | None = None,
             progress: bool = True, *, decode_once: bool = True) -> Quality:
    """Perplexity of ``model`` on ``windows``; with a reference, also KL and top-1 agreement (and
    ``reference.quality``, the original's own perplexity, when not known yet). Quantized linears
    compute what the reference kernel computes, whatever kernel would run them elsewhere: the
    figures are the format's own. ``decode_once=False`` decodes their weights on every call, as
    evaluations did before (same figures, slower; for comparisons)."""
    return evaluate_all({"model": model}, windows, reference, progress, decode_once=decode_once)["model"]


@torch.inference_mode()
def evaluate_all(models: Mapping[str, nn.Module], windows: Windows, reference: Reference | None = None,
                 progress: bool = True, *, decode_once: bool = True) -> dict[str, Quality]:
    """:func:`evaluate` for several models on the same windows, by name: each batch runs through
    the reference once for all of them (the figures are each model's own, as evaluated alone)."""
    if not models:
        raise AmpqError("evaluate_all needs at least one model")
    if reference is not None and reference.windows is not windows and not _same(reference.windows, windows):
        raise AmpqError("the reference was made for other windows than the ones evaluated; make the Reference "
                        "with the same Windows")
    vocab = max(_vocab(m) for m in models.values())
    batch = _batch_size(windows, vocab)
    slice_rows = max(1, SLICE_BYTES // (vocab * 4))
    sums = {name: _Sums() for name in models}
    n = len(windows.tokens)
    everything = list(models.values()) + ([reference.model] if reference is not None else [])
    with decoded_once(everything, once=decode_once):
        for start in tqdm(range(0, n, batch), desc="evaluate", unit="batch", disable=not progress, leave=False):
            tokens = windows.tokens[start:start + batch]
            ref_logits = _logits(reference.model, tokens) if reference is not None else None
            for name, model in models.items():
                logits = _logits(model, tokens)
                targets = tokens.to(logits.device)
                ref = ref_logits.to(logits.device) if ref_logits is not None else None
                for i, first in enumerate(windows.first_scored[start:start + batch]):
                    # position t is predicted from the logits at t - 1; the first token is never scored
                    for lo in range(max(first, 1), windows.window, slice_rows):
                        hi = min(windows.window, lo + slice_rows)
                        sums[name].add(logits[i, lo - 1:hi - 1], targets[i, lo:hi],
                                       ref[i, lo - 1:hi - 1] if ref is not None else None)
                del logits, ref
            del ref_logits
    first = next(iter(sums.values()))
    if reference is not None and reference.quality is None:
        reference.quality = Quality(math.exp(first.ref_nll / first.count), 0.0, 1.0, first.count, windows.window,
                                    windows.stride, windows.source)
    return {name: Quality(
        perplexity=math.exp(s.nll / s.count),
        kl=s.kl / s.count if reference is not None else None,
        top1=s.agree / s.count if reference is not None else None,
        tokens=s.count, window=windows.window, stride=windows.stride, source=windows.source)
        for name, s in sums.items()}
