"""Quality of an encoder (a sentence-embedding model) against its unquantized original, where there
is no next-token loss: how close each text's embedding stays to the original's (cosine similarity),
and whether search over the texts still finds the same neighbours.

A text's embedding is the mean of the last hidden state over its tokens (padding excluded), as
sentence-transformers pools all-MiniLM-L6-v2 and most BERT-family embedding models; cosine
similarity ignores the normalization they apply after.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ampq.decode_once import decoded_once
from ampq.errors import AmpqError

BATCH = 32  # texts embedded at once
NEIGHBOURS = 10  # the neighbourhood compared by ``overlap``


@dataclass
class EmbeddingQuality:
    cosine: float  # mean over texts of cos(embedding, original's embedding)
    cosine_min: float  # the lowest of them
    neighbours: float  # share of texts whose nearest other text is the same as under the original
    overlap: float  # mean share of the 10 nearest other texts that both models find
    texts: int
    max_tokens: int
    source: str

    def as_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, texts: list[str], max_tokens: int = 128, progress: bool = False) -> torch.Tensor:
    """(len(texts), hidden) float32: each text's mean-pooled last hidden state."""
    if tokenizer is None:
        raise AmpqError("an encoder is evaluated on texts, which needs its tokenizer; save the model with it")
    device = next(model.parameters()).device
    out = []
    for start in tqdm(range(0, len(texts), BATCH), desc="embed", unit="batch", disable=not progress, leave=False):
        batch = tokenizer(texts[start:start + BATCH], padding=True, truncation=True, max_length=max_tokens,
                          return_tensors="pt").to(device)
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1].float()
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        out.append(((hidden * mask).sum(1) / mask.sum(1).clamp(min=1)).cpu())
    return torch.cat(out)


def _nearest(emb: torch.Tensor, k: int) -> torch.Tensor:
    """(n, k) indices of each text's k nearest other texts by cosine similarity."""
    unit = F.normalize(emb, dim=-1)
    sim = unit @ unit.T
    sim.fill_diagonal_(-float("inf"))
    return sim.topk(k, dim=-1).indices


def compare(emb: torch.Tensor, ref: torch.Tensor, max_tokens: int, source: str) -> EmbeddingQuality:
    """The figures of embeddings ``emb`` against the original's ``ref`` (same texts, same order)."""
    cos = F.cosine_similarity(emb, ref, dim=-1)
    k = min(NEIGHBOURS, len(ref) - 1)
    mine, theirs = _nearest(emb, k), _nearest(ref, k)
    overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine, theirs)) / (k * len(ref))
    return EmbeddingQuality(float(cos.mean()), float(cos.min()), float((mine[:, 0] == theirs[:, 0]).float().mean()),
                            overlap, len(ref), max_tokens, source)


def evaluate_embeddings(models: dict[str, nn.Module], reference: nn.Module, tokenizer, texts: list[str], *,
                        max_tokens: int = 128, source: str = "texts", progress: bool = True
                        ) -> tuple[dict[str, EmbeddingQuality], EmbeddingQuality]:
    """Each model's :class:`EmbeddingQuality` against ``reference`` on ``texts``, and the
    reference's own (1 everywhere: the row a table prints for the original)."""
    if reference is None:
        raise AmpqError("an encoder has no next-token loss: its quality is measured against its original; give "
                        "the unquantized model (CLI: --reference)")
    if len(texts) < 2:
        raise AmpqError("comparing embeddings needs at least 2 texts")
    with decoded_once([reference]):
        ref = embed(reference, tokenizer, texts, max_tokens, progress)
    results = {}
    for name, model in models.items():
        with decoded_once([model]):
            results[name] = compare(embed(model, tokenizer, texts, max_tokens, progress), ref, max_tokens, source)
    return results, compare(ref, ref, max_tokens, source)
