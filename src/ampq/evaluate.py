"""Quality of a model against its unquantized original: perplexity, KL divergence, top-1 agreement."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.data import Windows


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
    """The original model's log-probabilities on a set of windows, computed once per batch and
    kept while they fit in ``cache_bytes`` (recomputed after that), so many quantized variants can
    be compared with one original."""

    def __init__(self, model: nn.Module, windows: Windows, cache_bytes: int = 4 << 30):
        self.model, self.windows, self.cache_bytes = model, windows, cache_bytes
        self._cache: dict[int, torch.Tensor] = {}
        self._cached_bytes = 0
        self.quality: Quality | None = None

    def logprobs(self, start: int, stop: int) -> torch.Tensor:
        if start in self._cache:
            return self._cache[start]
        lp = _logprobs(self.model, self.windows.tokens[start:stop])
        if self._cached_bytes + lp.numel() * 4 <= self.cache_bytes:
            self._cache[start] = lp
            self._cached_bytes += lp.numel() * 4
        return lp


@torch.inference_mode()
def _logprobs(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    from ampq import kernels

    device = next(model.parameters()).device
    with kernels.use("reference"):  # quality of the format itself, whatever kernel would run it
        logits = model(tokens.to(device), use_cache=False).logits
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def _batch_size(windows: Windows, vocab: int, budget: int = 1 << 29) -> int:
    return max(1, min(len(windows.tokens), budget // (windows.window * vocab * 4)))


@torch.inference_mode()
def evaluate(model: nn.Module, windows: Windows, reference: Reference | None = None,
             progress: bool = True) -> Quality:
    """Perplexity of ``model`` on ``windows``; with a reference, also KL and top-1 agreement."""
    vocab = model.get_output_embeddings().weight.shape[0] if hasattr(model, "get_output_embeddings") else 32000
    bs = _batch_size(windows, vocab)
    nll = kl = agree = 0.0
    ref_nll = 0.0
    count = 0
    n = len(windows.tokens)
    for start in tqdm(range(0, n, bs), desc="evaluate", unit="batch", disable=not progress, leave=False):
        stop = min(n, start + bs)
        tokens = windows.tokens[start:stop]
        lp = _logprobs(model, tokens)
        ref = reference.logprobs(start, stop) if reference is not None else None
        for i, first in enumerate(windows.first_scored[start:stop]):
            lo = max(first, 1)  # position t is predicted from the logits at t - 1
            target = tokens[i, lo:]
            pred = lp[i, lo - 1:-1]
            nll -= pred.gather(-1, target[:, None]).sum().item()
            count += target.numel()
            if ref is not None:
                r = ref[i, lo - 1:-1]
                ref_nll -= r.gather(-1, target[:, None]).sum().item()
                kl += (r.exp() * (r - pred)).sum().item()
                agree += (r.argmax(-1) == pred.argmax(-1)).sum().item()
    if reference is not None and reference.quality is None:
        reference.quality = Quality(math.exp(ref_nll / count), 0.0, 1.0, count, windows.window,
                                    windows.stride, windows.source)
    return Quality(
        perplexity=math.exp(nll / count),
        kl=kl / count if reference is not None else None,
        top1=agree / count if reference is not None else None,
        tokens=count, window=windows.window, stride=windows.stride, source=windows.source)
