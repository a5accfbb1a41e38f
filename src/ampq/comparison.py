"""Quality of one or more models against one original, on the same texts: what ``ampq.evaluate``
returns and ``ampq quantize --eval`` / ``ampq eval`` print. The measure follows the kind of model:
perplexity, KL and top-1 agreement for a language model (:mod:`ampq.evaluation`); for an encoder,
which has no next-token loss, the cosine similarity of its embeddings to the original's and the
agreement of nearest neighbours (:mod:`ampq.similarity`).

    results = ampq.evaluate({"ampq": model, "gptq int4-g128": uniform}, original, text="wiki", tokenizer=tok)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ampq.data import Text, Windows, text_pieces, windows_of
from ampq.errors import AmpqError
from ampq.evaluation import Quality, Reference
from ampq.evaluation import evaluate_all
from ampq.models import is_encoder
from ampq.report import linear_bits, model_bytes, print_table
from ampq.similarity import EmbeddingQuality, evaluate_embeddings

EVALUATION = {"windows": 32, "window": 512}  # a text's windows when only its name is given
# an encoder's texts when only a name is given: "windows" pieces of at most "window" tokens each
EMBEDDING_EVALUATION = {"windows": 256, "window": 128}


def evaluation_defaults(model: nn.Module) -> dict:
    """How a text given by name is cut for ``model``: windows for a language model, pieces for an encoder."""
    return dict(EMBEDDING_EVALUATION if is_encoder(model) else EVALUATION)


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
    token windows; names need the ``tokenizer``.

    Encoders (models that cannot generate, e.g. BERT) are measured by their embeddings instead
    (:class:`ampq.similarity.EmbeddingQuality`, against the ``reference``, which they need): a
    text's name gives 256 pieces of it of at most 128 tokens; an :class:`ampq.Text` gives
    ``windows`` pieces of at most ``window`` tokens."""
    if isinstance(models, nn.Module):
        models = {"model": models}
    if not models:
        raise AmpqError("evaluate needs at least one model")
    kinds = {is_encoder(m) for m in [*models.values(), *([reference] if reference is not None else [])]}
    if len(kinds) > 1:
        raise AmpqError("evaluate compares models of one kind: encoders by their embeddings, language models by "
                        "their next-token loss; give models of one kind")
    if kinds == {True}:
        return _evaluate_encoders(models, reference, text, tokenizer, progress)
    results = []
    for spec in _texts(text):
        windows = windows_of(spec, tokenizer, "eval", **EVALUATION)
        if not isinstance(windows, Windows):
            tokens = windows
            windows = Windows(tokens, [0] * len(tokens), tokens.shape[1], tokens.shape[1], "tokens")
        ref = Reference(reference, windows) if reference is not None else None
        quality = evaluate_all(models, windows, ref, progress=progress)
        name = spec.source if isinstance(spec, Text) else spec if isinstance(spec, str) else windows.source
        results.append(TextQuality(name, quality, ref.quality if ref is not None else None))
    return results


def _evaluate_encoders(models, reference, text, tokenizer, progress: bool) -> list[TextQuality]:
    results = []
    for spec in _texts(text):
        if not isinstance(spec, (str, Text)):
            raise AmpqError("an encoder is evaluated on texts, not token windows: give a text's name or an ampq.Text")
        spec = spec if isinstance(spec, Text) else Text(spec, **EMBEDDING_EVALUATION)
        pieces = text_pieces(spec.source, "eval", spec.windows)
        quality, own = evaluate_embeddings(models, reference, tokenizer, pieces, max_tokens=spec.window,
                                           source=f"{spec.source}:eval", progress=progress)
        results.append(TextQuality(spec.source, quality, own))
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
    top-1 agreement averaged over the texts (for encoders: a cosine column per text, then the lowest
    cosine and the neighbour agreement)."""
    if isinstance(next(iter(results[0].models.values())), EmbeddingQuality):
        _print_embedding_comparison(title, results, sizes, reference)
        return
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


def _print_embedding_comparison(title: str, results: list[TextQuality], sizes, reference: str) -> None:
    columns = ["model", "bits/weight (linears)", "model MB"] + [f"cosine {r.text}" for r in results] + [
        "min cosine", "same nearest", "top-10 overlap"]
    rows = []
    for name, (bits, nbytes) in sizes.items():
        qs = [r.reference if name == reference else r.models.get(name) for r in results]
        if any(q is None for q in qs):
            continue
        rows.append([name, bits, nbytes / 1e6] + [q.cosine for q in qs] + [
            min(q.cosine_min for q in qs), sum(q.neighbours for q in qs) / len(qs), sum(q.overlap for q in qs) / len(qs)])
    q0 = next(iter(results[0].models.values()))
    note = (f"encoder: cosine similarity of each text's mean-pooled embedding to the original's, mean over {q0.texts} "
            f"texts of at most {q0.max_tokens} tokens per corpus (held-out half); 'same nearest': share of texts "
            f"whose nearest other text is the original's; 'top-10 overlap': share of the 10 nearest found by both")
    print_table(title, columns, rows, note)


def size_of(model: nn.Module) -> tuple[float, int]:
    """(bits per weight over the linears, bytes of the whole model): a table's size columns."""
    return linear_bits(model), model_bytes(model)


def uniform_peers(model: nn.Module, original: nn.Module, spec, schemes: str | list[str] | None = None, *,
                  calibration=None, tokenizer=None, lm_head: bool | str = False, compute_dtype: str | None = None,
                  progress: bool = True) -> dict[str, nn.Module]:
    """Uniform models to score beside ``model`` (quantized from ``original`` by ``spec``), each
    quantized from a copy of ``original`` that shares its embedding table, by label. ``schemes``:
    scheme names (a list, or comma-separated; "none" for none); None with a :class:`~ampq.Budget`
    spec: the budget's candidate nearest its size, measured from the sensitivity table ``model``
    was planned with (what ``ampq quantize --budget B --eval`` sets beside it). A quantized embedding
    table or head that the budget or plan names is quantized the same way in every peer."""
    import sys

    from ampq.models import copy_sharing_embeddings
    from ampq.pipeline.budget import Budget
    from ampq.pipeline.planner import embedding_bytes_saved, fixed_bytes, head_bytes_saved, matching_uniform
    from ampq.pipeline.run import label, quantize
    from ampq.report import block_linear_names
    from ampq.schemes import get_scheme
    from ampq.sensitivity import SensitivityTable

    embeddings, head = getattr(spec, "embeddings", None), getattr(spec, "head", None)
    if schemes is None and isinstance(spec, Budget):
        table = SensitivityTable(**model.ampq_manifest["sensitivity"])
        fixed = fixed_bytes(original, block_linear_names(original)) - embedding_bytes_saved(original, embeddings) \
            - head_bytes_saved(original, head)
        chosen = [matching_uniform(table, spec, fixed)]
    else:
        names = schemes.split(",") if isinstance(schemes, str) else list(schemes or [])
        chosen = [get_scheme(n.strip()) for n in names if n.strip() and n.strip() != "none"]
    peers = {}
    for scheme in chosen:
        if progress:
            print(f"for comparison: {label(scheme)} in every linear", file=sys.stderr)
        peers[label(scheme)] = quantize(copy_sharing_embeddings(original), scheme, calibration=calibration,
                                        tokenizer=tokenizer, lm_head=head or lm_head, compute_dtype=compute_dtype,
                                        embeddings=embeddings, progress=progress)
    return peers
