"""Quality of one or more models against one original, on the same texts: what ``ampq.evaluate``
returns and ``ampq quantize --eval`` / ``ampq eval`` print.

    results = ampq.evaluate({"ampq": model, "gptq int4-g128": uniform}, original, text="wiki", tokenizer=tok)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ampq.data import Text, Windows, windows_of
from ampq.errors import AmpqError
from ampq.evaluate import Quality, Reference
from ampq.evaluate import evaluate as evaluate_windows
from ampq.report import linear_bits, model_bytes, print_table

EVALUATION = {"windows": 32, "window": 512}  # a text's windows when only its name is given


@dataclass
class TextQuality:
    """Each model's quality on one text, and the original's (``None`` without one)."""

    text: str
    models: dict[str, Quality]
    reference: Quality | None

    def as_dict(self) -> dict:
        return {"corpus": self.text, "models": {k: q.as_dict() for k, q in self.models.items()},
                "reference": self.reference.as_dict() if self.reference is not None else None}


def evaluate(models: nn.Module | Mapping[str, nn.Module], reference: nn.Module | None = None, *,
             text: str | Text | Windows | torch.Tensor | list = "wiki", tokenizer=None,
             progress: bool = True) -> list[TextQuality]:
    """Perplexity of each model on each text; with the ``reference`` (the original), also the KL
    to it and how often both pick the same next token. ``models``: one model (named "model") or
    models by name. ``text``: a text's name (comma-separated names for several; 32 windows of 512
    tokens each, from the second half of the text), an :class:`ampq.Text`, a list of them, or
    token windows; names need the ``tokenizer``."""
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise AmpqError("evaluate needs at least one model")
    results = []
    for spec in _texts(text):
        windows = windows_of(spec, tokenizer, "eval", **EVALUATION)
        if not isinstance(windows, Windows):
            tokens = windows
            windows = Windows(tokens, [0] * len(tokens), tokens.shape[1], tokens.shape[1], "tokens")
        ref = Reference(reference, windows) if reference is not None else None
        quality = {name: evaluate_windows(m, windows, ref, progress=progress) for name, m in models.items()}
        name = spec.source if isinstance(spec, Text) else spec if isinstance(spec, str) else windows.source
        results.append(TextQuality(name, quality, ref.quality if ref is not None else None))
    return results


def _texts(text) -> list:
    if isinstance(text, str):
        names = [t.strip() for t in text.split(",") if t.strip()]
        if not names:
            raise AmpqError("give a text to evaluate on, e.g. wiki (CLI: --corpus wiki)")
        return names
    return list(text) if isinstance(text, (list, tuple)) else [text]


def print_comparison(title: str, results: list[TextQuality], sizes: Mapping[str, tuple[float, int]],
                     reference: str = "original") -> None:
    """One table: a row per model (``sizes``: bits per weight of the linears, bytes of the whole
    model, by name; the original's under ``reference``), a perplexity column per text, then KL and
    top-1 agreement averaged over the texts."""
    columns = ["model", "bits/weight (linears)", "model MB"] + [f"ppl {r.text}" for r in results] + ["KL", "top-1"]
    rows = []
    for name, (bits, nbytes) in sizes.items():
        qs = [r.reference if name == reference else r.models.get(name) for r in results]
        if any(q is None for q in qs):
            continue
        kl = sum(q.kl for q in qs) / len(qs) if qs[0].kl is not None else None
        top1 = sum(q.top1 for q in qs) / len(qs) if qs[0].top1 is not None else None
        rows.append([name, bits, nbytes / 1e6] + [q.perplexity for q in qs] + [kl, top1])
    q0 = next(iter(results[0].models.values()))
    note = (f"perplexity over {q0.tokens} scored tokens per text, window {q0.window}, stride {q0.stride}, "
            f"held-out half of each text; KL(original || model) in nats per token, averaged over texts")
    print_table(title, columns, rows, note)


def size_of(model: nn.Module) -> tuple[float, int]:
    """(bits per weight over the linears, bytes of the whole model): a table's size columns."""
    return linear_bits(model), model_bytes(model)
