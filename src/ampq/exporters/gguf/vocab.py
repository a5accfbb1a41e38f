"""The tokenizer of a GGUF export: llama.cpp's ``tokenizer.ggml.*`` keys, as llama.cpp's
convert_hf_to_gguf.py writes them, for the two kinds of tokenizer.json decoder models use: byte-level
BPE (``gpt2``: SmolLM, Qwen, Llama 3) and SentencePiece BPE with byte fallback (``llama``: Llama 2,
Mistral, Phi-3, Gemma), and BERT's WordPiece (``bert``).

A SentencePiece tokenizer's scores come from its ``tokenizer.model`` when the checkpoint has one and
the ``sentencepiece`` package is installed (what the converter reads); otherwise from the merges of
tokenizer.json: llama.cpp's SentencePiece tokenizer joins first the neighbours whose joined piece
scores highest, so each piece scores minus the rank of the merge that makes it, the order in which
transformers' BPE applies them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from ampq.errors import AmpqError

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPACE = "\u2581"  # SentencePiece's mark for a space
_SPLITS = {_QWEN2_SPLIT: "qwen2", _LLAMA3_SPLIT: "llama-bpe"}


def _pre_tokenizer(spec: dict, vocab: dict) -> str | None:
    """llama.cpp's name (``tokenizer.ggml.pre``) for a tokenizer.json's pre-tokenizer, or None."""
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        # GPT-2's split. A vocabulary with no token joining a digit 0-9 to anything was learned
        # with digits split one by one: SmolLM's ("smollm" = each digit apart, then GPT-2's split;
        # transformers rebuilds SmolLM's tokenizer from a GGUF without the digit split).
        mixed = any(len(t) > 1 and any("0" <= ch <= "9" for ch in t) for t in vocab)
        return "gpt-2" if mixed else "smollm"
    if (kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits")
            and parts[1].get("use_regex", True)):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        return _SPLITS.get((parts[0].get("pattern") or {}).get("Regex"))
    return None


def read_tokenizer(directory: Path, vocab_size: int, warnings: list[str]) -> dict | None:
    """llama.cpp's tokenizer keys for the checkpoint's tokenizer (as its converter makes them:
    ``_set_vocab_gpt2`` or ``_set_vocab_sentencepiece``); None without one."""
    spec_file = directory / "tokenizer.json"
    if not spec_file.is_file():
        warnings.append(f"{directory} has no tokenizer.json: the GGUF carries no tokenizer, and llama.cpp cannot "
                        "run text through it (re-save the checkpoint with its tokenizer)")
        return None
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") == "WordPiece":
        return _wordpiece(directory, spec, vocab_size)
    byte_level = any((spec.get(k) or {}).get("type") == "ByteLevel"
                     or any(p.get("type") == "ByteLevel" for p in (spec.get(k) or {}).get("pretokenizers", []))
                     for k in ("pre_tokenizer", "decoder"))
    sentencepiece = model.get("type") == "BPE" and bool(model.get("byte_fallback")) and not byte_level
    if model.get("type") != "BPE" or not (byte_level or sentencepiece):
        kind = f"{model.get('type') or 'of unknown type'}{'' if byte_level else ', not byte-level, without byte fallback'}"
        raise AmpqError(f"cannot export {directory} to GGUF: its tokenizer is {kind} (tokenizer.json); this "
                        "exporter writes byte-level BPE (SmolLM, Qwen2, Llama 3) and SentencePiece BPE with byte "
                        "fallback (Llama 2, Mistral, Phi-3, Gemma). Convert the original model with llama.cpp's "
                        "convert_hf_to_gguf.py instead")
    tok, reverse = _tokenizer(directory, vocab_size)
    added = tok.added_tokens_decoder
    unk = model.get("unk_token")
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None or token == f"[PAD{i}]":  # a padding slot (a GGUF read back names them so)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif sentencepiece and token == unk:
            tokens.append(token)
            types.append(T.UNKNOWN)
        elif i in added:
            tokens.append(token)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        elif sentencepiece and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(T.BYTE)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    special = gguf.SpecialVocab(directory, load_merges=not sentencepiece, n_vocab=vocab_size)
    # what the tokenizer really does with plain text decides llama.cpp's add-BOS / add-EOS flags
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token["bos"] = bool(bos is not None and len(full) > len(plain) and full[0] == bos)
    special.add_special_token["eos"] = bool(eos is not None and len(full) > len(plain) and full[-1] == eos)
    if sentencepiece:
        return {"model": "llama", "pre": "default", "tokens": tokens, "types": types, "special": special,
                "scores": _scores(directory, model, tokens, types, warnings),
                "add_space_prefix": _prepends_space(spec, warnings)}
    pre = _pre_tokenizer(spec, model.get("vocab") or {})
    if pre is None:
        warnings.append("the tokenizer's pre-tokenizer is none llama.cpp names (known here: gpt-2, smollm, qwen2, "
                        "llama-bpe); written as 'default', so llama.cpp may split text differently from transformers")
        pre = "default"
    if not special.merges:
        raise AmpqError(f"{directory}/tokenizer.json has no merges; a BPE tokenizer without them cannot be written")
    return {"model": "gpt2", "pre": pre, "tokens": tokens, "types": types, "special": special}


def _tokenizer(directory: Path, vocab_size: int):
    """The checkpoint's tokenizer and its id -> token map, refused when it names ids the model lacks."""
    tok = AutoTokenizer.from_pretrained(directory)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise AmpqError(f"{directory}: the tokenizer has token id {max(reverse)}, but the model's vocabulary is "
                        f"{vocab_size}; they do not belong together")
    return tok, reverse


def _wordpiece(directory: Path, spec: dict, vocab_size: int) -> dict:
    """A BERT tokenizer as llama.cpp's converter writes it (``tokenizer.ggml.model`` "bert"): every
    token in "phantom space" form, a word's first piece with ▁ in front and a continuation (``##x``)
    without its mark, special tokens as they are. llama.cpp's WordPiece lower-cases and strips accents
    always, so a cased tokenizer is refused rather than split differently."""
    normalizer = spec.get("normalizer") or {}
    if normalizer.get("type") == "BertNormalizer" and not normalizer.get("lowercase", True):
        raise AmpqError(f"cannot export {directory} to GGUF: its WordPiece tokenizer keeps case, and llama.cpp's "
                        "bert tokenizer lower-cases every text; serve this model with ampq or transformers")
    prefix = (spec.get("model") or {}).get("continuing_subword_prefix", "##")
    tok, reverse = _tokenizer(directory, vocab_size)
    added = tok.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added and added[i].special:
            tokens.append(token)
            types.append(T.CONTROL)
        else:
            tokens.append(token[len(prefix):] if token.startswith(prefix) else _SPACE + token)
            types.append(T.NORMAL)
    special = gguf.SpecialVocab(directory, load_merges=False, n_vocab=vocab_size)
    special.special_token_ids.pop("cls", None)  # GGUF has no key for it: llama.cpp's bert takes it as bos
    ids = {"bos": tok.cls_token_id, "eos": tok.sep_token_id, "unk": tok.unk_token_id, "sep": tok.sep_token_id,
           "pad": tok.pad_token_id, "mask": tok.mask_token_id}
    special.special_token_ids.update({k: v for k, v in ids.items() if v is not None})
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    special.add_special_token["bos"] = bool(len(full) > len(plain) and full[0] == tok.cls_token_id)
    special.add_special_token["eos"] = bool(len(full) > len(plain) and full[-1] == tok.sep_token_id)
    return {"model": "bert", "pre": "default", "tokens": tokens, "types": types, "special": special}


def _scores(directory: Path, model: dict, tokens: list[str], types: list, warnings: list[str]) -> list[float]:
    """Each token's SentencePiece score: ``tokenizer.model``'s when it can be read, else minus the
    rank of the merge that makes it (tokens no merge makes are never joined, so 0 serves)."""
    path = directory / "tokenizer.model"
    if path.is_file():
        try:
            import sentencepiece
            sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
            if [sp.id_to_piece(i) for i in range(sp.vocab_size())] == tokens[:sp.vocab_size()]:
                return [sp.get_score(i) if i < sp.vocab_size() else 0.0 for i in range(len(tokens))]
            warnings.append("tokenizer.model does not match tokenizer.json; the scores were taken from the merges")
        except ImportError:
            pass  # the merges give the same order
    rank: dict[str, int] = {}
    for r, merge in enumerate(model.get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, r)
    T = gguf.TokenType
    return [-float(rank[t]) if t in rank and k == T.NORMAL else 0.0 for t, k in zip(tokens, types)]


def _prepends_space(spec: dict, warnings: list[str]) -> bool:
    """Whether the tokenizer puts ▁ in front of a text (llama.cpp's ``add_space_prefix``): Llama 2's
    and Mistral's normalizer or Metaspace pre-tokenizer do, Gemma's does not."""
    def steps(key: str) -> list[dict]:
        node = spec.get(key) or {}
        return node.get("normalizers" if key == "normalizer" else "pretokenizers", [node]) if node else []

    prepend = False
    for step in steps("normalizer"):
        if step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
            prepend = True
        elif not (step.get("type") == "Replace" and step.get("content") == _SPACE):
            warnings.append(f"the tokenizer's normalizer step {step.get('type')!r} is none llama.cpp applies: "
                            "llama.cpp may split some texts differently from transformers")
    for step in steps("pre_tokenizer"):
        if step.get("type") == "Metaspace":
            prepend = prepend or step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else
                                          "never") != "never"
            if step.get("split", True):
                warnings.append("the tokenizer splits text at every space before merging (Metaspace split); "
                                "llama.cpp merges across them, so it may tokenize some texts differently")
    return prepend


def write_tokenizer(writer, tokenizer: dict | None) -> dict:
    """Write what :func:`read_tokenizer` read; return its summary."""
    if tokenizer is None:
        return {}
    writer.add_tokenizer_model(tokenizer["model"])
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    if "scores" in tokenizer:
        writer.add_token_scores(tokenizer["scores"])
        writer.add_add_space_prefix(tokenizer["add_space_prefix"])
    writer.add_token_types(tokenizer["types"])
    special = tokenizer["special"]
    special.add_to_gguf(writer, quiet=True)
    summary = {"model": tokenizer["model"], "pre": tokenizer["pre"], "tokens": len(tokenizer["tokens"])}
    if special.merges:
        summary["merges"] = len(special.merges)
    if "scores" in tokenizer:
        summary["add_space_prefix"] = tokenizer["add_space_prefix"]
    return {**summary, "special": dict(special.special_token_ids), "add": dict(special.add_special_token),
            "chat_template": special.chat_template is not None}
