"""QuantEmbedding: a token embedding table stored in one of ampq's formats, and the output head of a
model that reads its embedding table as its head (tied embeddings).

The table is a large share of a small model's bytes, and llama.cpp's default files quantize it
(Q4_K_M: the table in Q4_K, or in Q6_K where it is also the head), so a plan held to the size of
such a file has to quantize it too. A lookup decodes only the rows it reads: every format whose
stored tensors run row by row (packed codes, per-group scales, GGUF blocks) can be cut to rows;
a format with parameters shared across rows (double quantization) cannot, and is refused.

The table is quantized by round to nearest: an embedding row is read, not multiplied, so GPTQ's
error compensation over the inputs has nothing to work on. Where the table is also the head, the
head multiplies by the same stored table (:class:`TiedQuantHead`), as llama.cpp does when a file
has no separate ``output`` tensor.
"""

from __future__ import annotations

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.kernels import linear
from ampq.models import replace_module, tied_embeddings
from ampq.nn import QuantLinear


_DIRECT_ROWS = 64  # up to this many tokens, rows are decoded as they come (repeats and all)


def rows_of(stored: dict[str, torch.Tensor], shape: tuple[int, int], rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """The stored tensors of the rows ``rows`` of a quantized (out, in) table alone, as if the table
    were those rows; ValueError where a stored tensor does not run row by row."""
    out = shape[0]
    picked = {}
    for key, t in stored.items():
        if t.numel() == 1:  # one parameter for the whole table
            picked[key] = t
        elif t.dim() >= 1 and t.shape[0] == out and t.dim() > 1:
            picked[key] = t.index_select(0, rows)
        elif t.dim() == 1 and key == "codes" and t.numel() % out == 0:  # bit-packed codes, whole bytes per row
            picked[key] = t.reshape(out, -1).index_select(0, rows).reshape(-1)
        else:
            raise ValueError(f"its stored {key!r} is shared across rows")
    return picked


def check_row_format(format_name: str, shape: tuple[int, int]) -> None:
    """A one-line error naming why a table of ``shape`` cannot be stored in ``format_name`` and read by rows."""
    fmt = get_format(format_name)
    rows, cols = shape
    try:
        if cols * fmt.bits % 8:
            raise ValueError(f"a row of {cols} {fmt.bits}-bit codes is not a whole number of bytes")
        probe = fmt.quantize(torch.randn(2, cols))
        rows_of(probe, (2, cols), torch.tensor([1]))
    except ValueError as e:
        raise AmpqError(f"cannot store the embedding table ({rows}x{cols}) in {format_name}: {e}; choose another "
                        "--embeddings format (e.g. int8-g32-sym, q6_k or int4-g32)") from None


class QuantEmbedding(QuantLinear):
    """An ``nn.Embedding`` whose table is stored in a format: the stored tensors of a (vocabulary,
    width) QuantLinear, read a row per token. Not counted among the linears (its entry in the layer
    table is of kind "embedding")."""

    is_quantized_linear = False
    is_quantized_embedding = True

    def __init__(self, num_embeddings: int, embedding_dim: int, format_name: str, stored: dict[str, torch.Tensor],
                 dtype: torch.dtype, padding_idx: int | None = None, embed_scale=None, algorithm: str = "rtn"):
        super().__init__(embedding_dim, num_embeddings, format_name, stored, algorithm=algorithm)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.out_dtype = dtype
        self._format = get_format(format_name)  # looked up once: a compiled step cannot trace the registry
        # models that scale their embeddings in the embedding module (Gemma's sqrt(width)) keep doing so
        self.embed_scale = embed_scale

    @property
    def weight(self) -> torch.Tensor:
        """The decoded table (what transformers' code that reads ``embed_tokens.weight`` for its dtype
        or device gets); the lookup never builds it."""
        return self.dequantize(self.out_dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        if torch.compiler.is_compiling() or flat.numel() <= _DIRECT_ROWS:
            rows = self._rows(flat)  # a decode step: no data-dependent shapes in a compiled graph
        else:  # a prompt: each distinct token's row decoded once
            unique, inverse = torch.unique(flat, return_inverse=True)
            rows = self._rows(unique).index_select(0, inverse)
        out = rows.reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:
            out = out * torch.as_tensor(self.embed_scale, dtype=out.dtype, device=out.device)
        return out

    def _rows(self, ids: torch.Tensor) -> torch.Tensor:
        picked = rows_of(self.stored(), self.shape, ids)
        return self._format.dequantize(picked, (ids.numel(), self.embedding_dim)).to(self.out_dtype)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, format_name: str) -> "QuantEmbedding":
        weight = embedding.weight.detach()
        check_row_format(format_name, tuple(weight.shape))
        bad = (~torch.isfinite(weight)).any(dim=1).nonzero()
        if bad.numel():
            raise ValueError(f"row {int(bad[0])} holds inf or NaN; the checkpoint is damaged or was saved mid-training")
        fmt = get_format(format_name)
        codes, params = fmt.quantize_codes(weight.float())
        return cls(weight.shape[0], weight.shape[1], format_name, fmt.pack(codes, params), weight.dtype,
                   embedding.padding_idx, getattr(embedding, "embed_scale", None))

    def extra_repr(self) -> str:
        return f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, format={self.format_name}"


class TiedQuantHead(nn.Module):
    """The output head of a tied model whose table is a :class:`QuantEmbedding`: logits from the same
    stored tensors, which stay the embeddings' (stored, saved and moved once)."""

    def __init__(self, table: QuantEmbedding):
        super().__init__()
        object.__setattr__(self, "table", table)  # not a child module: it is the embeddings'

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(self.table, x)

    def extra_repr(self) -> str:
        return f"tied to the {self.table.format_name} embedding table"


def quantized_embeddings(model: nn.Module) -> dict[str, QuantEmbedding]:
    """Every quantized embedding table of ``model``, by module name."""
    return {n: m for n, m in model.named_modules() if getattr(m, "is_quantized_embedding", False)}


def _plain_embedding(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward is the plain lookup, or that scale by ``embed_scale`` only."""
    return isinstance(module, nn.Embedding) and (type(module).forward is nn.Embedding.forward
                                                  or hasattr(module, "embed_scale"))


def quantize_embeddings(model: nn.Module, format_name: str) -> str:
    """Store ``model``'s input embedding table in ``format_name`` (round to nearest); a head tied to
    it becomes a :class:`TiedQuantHead` over the same table. Returns the table's module name."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if emb is None or getattr(emb, "is_quantized_embedding", False):
        raise AmpqError(f"{type(model).__name__} has no float embedding table to quantize; drop --embeddings")
    if not _plain_embedding(emb):
        raise AmpqError(f"{type(model).__name__}'s embeddings ({type(emb).__name__}) compute more than a lookup, "
                        "which a quantized table would drop; drop --embeddings for this model")
    tied = tied_embeddings(model)
    try:
        table = QuantEmbedding.from_embedding(emb, format_name)
    except ValueError as e:  # the table's own values (inf or NaN)
        raise AmpqError(f"cannot quantize the embedding table of {type(model).__name__}: {e}") from None
    name = next(n for n, m in model.named_modules() if m is emb)
    replace_module(model, name, table.to(emb.weight.device))
    if tied:
        model.set_output_embeddings(TiedQuantHead(model.get_submodule(name)))
    return name
