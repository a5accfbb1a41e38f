"""Text for calibration and evaluation, cut into token windows.

Convention: calibration draws only from the first half of a text, evaluation only from the second
half, so the two never overlap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ampq import builtin
from ampq.errors import AmpqError
from ampq.experts import expert_shape, experts_modules, projections

HUB_DATASETS = {"wikitext2": ("wikitext", "wikitext-2-raw-v1", "text")}
_DOC_TAG = re.compile(r"^</?doc[^>]*>\s*$", re.MULTILINE)


def read_text(spec: str) -> str:
    """Whole text of a built-in corpus (wiki, c4, tiny, code, technical, multilingual), a hub
    dataset (wikitext2, needs the `datasets` package and a hub) or a UTF-8 file."""
    path = Path(spec).expanduser()
    if spec in builtin.CORPORA and not path.exists():
        path = builtin.fetch_corpus(spec)
    elif spec in HUB_DATASETS and not path.exists():
        return _hub_text(spec)
    if not path.is_file():
        raise AmpqError(f"no text {spec!r}: give a built-in corpus ({', '.join(builtin.CORPORA)}), "
                        f"{', '.join(HUB_DATASETS)}, or a UTF-8 text file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise AmpqError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    return _DOC_TAG.sub("", text)


def _hub_text(spec: str) -> str:
    try:
        import datasets
    except ImportError:
        raise AmpqError(f"corpus {spec!r} needs the `datasets` package: pip install datasets") from None
    name, config, column = HUB_DATASETS[spec]
    try:
        parts = [datasets.load_dataset(name, config, split=s)[column] for s in ("train", "test")]
    except Exception as e:  # network and hub errors come in many types
        raise AmpqError(f"cannot fetch {spec!r} from the hub ({type(e).__name__}); use a built-in corpus or a file") from None
    # train text is the first half (calibration), test text the second (evaluation)
    return "\n\n".join(["".join(parts[0]), "".join(parts[1])])


def split_text(text: str, split: str) -> str:
    half = len(text) // 2
    if split == "calib":
        return text[:half]
    if split == "eval":
        return text[half:]
    raise ValueError(f"split is 'calib' or 'eval', not {split!r}")


@dataclass
class Windows:
    """Token windows of one text: ``tokens`` (n, window); in each window the positions from
    ``first_scored`` on are scored (a sliding evaluation with stride < window scores only the new
    tokens)."""

    tokens: torch.Tensor
    first_scored: list[int]
    window: int
    stride: int
    source: str

    @property
    def scored_tokens(self) -> int:
        return sum(self.window - max(f, 1) for f in self.first_scored)


# Calibration on one domain steers an allocation toward what matters there; the default mixes four
# (prose, code, technical writing, other languages), and leaves c4 (web text) out, so evaluating on c4
# always checks a domain that calibration did not see.
MIXES = {"mix": "wiki+code+technical+multilingual"}


def make_windows(tokenizer, spec: str, split: str = "eval", window: int = 512, n: int = 32,
                 stride: int | None = None) -> Windows:
    """``n`` windows of ``window`` tokens with ``stride`` (default: ``window``, no overlap), taken
    from the start of the given half of the text. ``spec`` may join texts with ``+``
    (``wiki+code``), or name a mix of :data:`MIXES`: the windows are shared out evenly among them."""
    spec = MIXES.get(spec, spec)
    if "+" in spec:
        return _mixed_windows(tokenizer, spec.split("+"), split, window, n, stride)
    if tokenizer is None:
        raise AmpqError("this model came without a tokenizer (a checkpoint saved without one); save it with its "
                        "tokenizer, or quantize from a model folder that has one")
    stride = stride or window
    if not 0 < stride <= window:
        raise AmpqError(f"stride must be between 1 and the window ({window}), not {stride}")
    text = split_text(read_text(spec), split)
    need = window + stride * (n - 1)
    ids: list[int] = []
    chars = need * 8
    while True:  # tokenize only as much text as the windows need
        ids = tokenizer(text[:chars], add_special_tokens=False)["input_ids"]
        if len(ids) >= need or chars >= len(text):
            break
        chars *= 2
    if len(ids) < window:
        raise AmpqError(f"text {spec!r} ({split} half) has {len(ids)} tokens, fewer than one window of "
                        f"{window}; use a longer text or a smaller --window")
    count = min(n, 1 + (len(ids) - window) // stride)
    tokens = torch.tensor([ids[i * stride: i * stride + window] for i in range(count)], dtype=torch.long)
    first = [0] + [window - stride] * (count - 1)
    return Windows(tokens, first, window, stride, f"{spec}:{split}")


def _mixed_windows(tokenizer, specs: list[str], split: str, window: int, n: int, stride: int | None) -> Windows:
    specs = [t.strip() for t in specs if t.strip()]
    if not specs or n < len(specs):
        raise AmpqError(f"a mix of {len(specs)} texts needs at least {len(specs)} windows, not {n}: give "
                        f"--calib-windows {len(specs)} or more, or one text (--calib wiki)")
    parts = [make_windows(tokenizer, t, split, window, n // len(specs) + (i < n % len(specs)), stride)
             for i, t in enumerate(specs)]
    return Windows(torch.cat([w.tokens for w in parts]), [f for w in parts for f in w.first_scored], window,
                   parts[0].stride, f"{'+'.join(specs)}:{split}")


PIECE_CHARS = (40, 600)  # a piece of text for an encoder: at least a sentence, at most about 128 tokens


def text_pieces(spec: str, split: str = "eval", n: int = 256) -> list[str]:
    """Up to ``n`` pieces of the given half of a text, for an encoder to embed one by one: its lines
    (paragraphs) in order, each long one cut at spaces into pieces of at most 600 characters,
    pieces under 40 characters dropped."""
    low, high = PIECE_CHARS
    pieces: list[str] = []
    for line in split_text(read_text(spec), split).splitlines():
        words, piece = line.split(), ""
        for word in words:
            if piece and len(piece) + 1 + len(word) > high:
                pieces.append(piece)
                piece = ""
            piece = f"{piece} {word}" if piece else word
        pieces.append(piece)
        pieces = [p for p in pieces if len(p) >= low]
        if len(pieces) >= n:
            return pieces[:n]
    if len(pieces) < 2:
        raise AmpqError(f"text {spec!r} ({split} half) has {len(pieces)} pieces of {low} characters or more; an "
                        "encoder is compared on at least 2: use a longer text")
    return pieces


@dataclass(frozen=True)
class Text:
    """Which text, and how many windows of how many tokens to cut from it: a built-in corpus (wiki,
    c4, tiny, code, technical, multilingual), a hub dataset (wikitext2) or a UTF-8 file. Calibration
    reads the first half of the text, evaluation the second."""

    source: str = "wiki"
    windows: int | None = None  # None: for calibration, as many as the model needs (calibration_windows)
    window: int = 512
    stride: int | None = None

    def describe(self) -> str:
        return f"{self.source}, {self.windows} windows of {self.window} tokens"

    def cut(self, tokenizer, split: str) -> Windows:
        if self.windows is None:
            raise AmpqError(f"text {self.source!r}: say how many windows to cut (Text(..., windows=N))")
        return make_windows(tokenizer, self.source, split, self.window, self.windows, self.stride)


def as_text(spec: "Text | str", **defaults) -> Text:
    """A :class:`Text` from a text's name (``defaults`` give its windows, window, stride) or as it
    is, its windows from ``defaults`` when it does not say."""
    if not isinstance(spec, Text):
        return Text(spec, **defaults)
    return replace(spec, windows=defaults["windows"]) if spec.windows is None and "windows" in defaults else spec


MIN_CALIBRATION_WINDOWS = 32
MAX_EXPERT_CALIBRATION_WINDOWS = 256


def calibration_windows(model: nn.Module, window: int = 512) -> int:
    """How many calibration windows of ``window`` tokens a model gets by default: enough tokens for
    twice the inputs of its widest linear, so that every GPTQ Hessian (inputs x inputs, summed over
    tokens) has full rank with room to spare, and never fewer than 32 (the quality table's
    calibration, docs/mixed-precision.md).

    A mixture-of-experts expert sees only the tokens routed to it, ``top_k`` of its ``n`` experts on
    average, so its inputs need ``n / top_k`` times the tokens; for many small experts that grows
    fast (DeepSeek-V3: 32x), so experts alone never ask for more than
    :data:`MAX_EXPERT_CALIBRATION_WINDOWS`, beyond which GPTQ's damping carries the rarely routed ones."""
    widest = max((m.in_features for m in model.modules() if isinstance(m, nn.Linear)), default=0)
    needed = math.ceil(2 * widest / window)
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    top_k = int(getattr(config, "num_experts_per_tok", None) or 1)
    for module in experts_modules(model).values():
        for projection in projections(module):
            inputs = expert_shape(module, projection)[1]
            share = min(1.0, top_k / module._parameters[projection].shape[0])
            needed = max(needed, min(MAX_EXPERT_CALIBRATION_WINDOWS, math.ceil(2 * inputs / share / window)))
    return max(MIN_CALIBRATION_WINDOWS, needed)


def sized_for(spec, model: nn.Module, window: int = 512):
    """Calibration as given, a text's name or a :class:`Text` without a count given the model's
    :func:`calibration_windows`."""
    if isinstance(spec, str):
        spec = Text(spec, window=window)
    if isinstance(spec, Text) and spec.windows is None:
        spec = replace(spec, windows=calibration_windows(model, spec.window))
    return spec


def windows_of(spec, tokenizer, split: str, **defaults) -> "Windows | torch.Tensor | None":
    """Token windows from what a caller gave: a text's name or a :class:`Text` (cut with the
    tokenizer), windows already cut, an (n, T) tensor of token ids, or None."""
    if spec is None or isinstance(spec, (Windows, torch.Tensor)):
        return spec
    if isinstance(spec, (str, Text)):
        return as_text(spec, **defaults).cut(tokenizer, split)
    raise AmpqError(f"calibration is a text's name (e.g. 'wiki'), an ampq.Text, token windows or an (n, T) tensor "
                    f"of token ids, not {type(spec).__name__}")
