"""The tokenizer of a GGUF export: llama.cpp's ``tokenizer.ggml.*`` keys for a byte-level BPE
tokenizer, as llama.cpp's convert_hf_to_gguf.py writes them."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
from transformers import AutoTokenizer

from ampq.errors import AmpqError

_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
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
    """llama.cpp's tokenizer keys for the checkpoint's tokenizer, as its convert_hf_to_gguf.py makes
    them for a BPE vocabulary (``get_vocab_base`` / ``_set_vocab_gpt2``); None without one."""
    spec_file = directory / "tokenizer.json"
    if not spec_file.is_file():
        warnings.append(f"{directory} has no tokenizer.json: the GGUF carries no tokenizer, and llama.cpp cannot "
                        "run text through it (re-save the checkpoint with its tokenizer)")
        return None
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    byte_level = any((spec.get(k) or {}).get("type") == "ByteLevel"
                     or any(p.get("type") == "ByteLevel" for p in (spec.get(k) or {}).get("pretokenizers", []))
                     for k in ("pre_tokenizer", "decoder"))
    if model.get("type") != "BPE" or not byte_level:
        kind = f"{model.get('type') or 'of unknown type'}{'' if byte_level else ', not byte-level'}"
        raise AmpqError(f"cannot export {directory} to GGUF: its tokenizer is {kind} (tokenizer.json); this "
                        "exporter writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen2, Llama 3). Convert "
                        "the original model with llama.cpp's convert_hf_to_gguf.py instead")
    tok = AutoTokenizer.from_pretrained(directory)
    reverse = {i: t for t, i in tok.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise AmpqError(f"{directory}: the tokenizer has token id {max(reverse)}, but the model's vocabulary is "
                        f"{vocab_size}; they do not belong together")
    added = tok.added_tokens_decoder
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(vocab_size):
        token = reverse.get(i)
        if token is None or token == f"[PAD{i}]":  # a padding slot (a GGUF read back names them so)
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(T.NORMAL)
    pre = _pre_tokenizer(spec, model.get("vocab") or {})
    if pre is None:
        warnings.append("the tokenizer's pre-tokenizer is none llama.cpp names (known here: gpt-2, smollm, qwen2, "
                        "llama-bpe); written as 'default', so llama.cpp may split text differently from transformers")
        pre = "default"
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise AmpqError(f"{directory}/tokenizer.json has no merges; a BPE tokenizer without them cannot be written")
    # what the tokenizer really does with plain text decides llama.cpp's add-BOS / add-EOS flags
    plain, full = tok("a", add_special_tokens=False)["input_ids"], tok("a")["input_ids"]
    bos, eos = special.special_token_ids.get("bos"), special.special_token_ids.get("eos")
    special.add_special_token["bos"] = bool(bos is not None and len(full) > len(plain) and full[0] == bos)
    special.add_special_token["eos"] = bool(eos is not None and len(full) > len(plain) and full[-1] == eos)
    return {"pre": pre, "tokens": tokens, "types": types, "special": special}


def write_tokenizer(writer, tokenizer: dict | None) -> dict:
    """Write what :func:`read_tokenizer` read; return its summary."""
    if tokenizer is None:
        return {}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    special = tokenizer["special"]
    special.add_to_gguf(writer, quiet=True)
    return {"model": "gpt2", "pre": tokenizer["pre"], "tokens": len(tokenizer["tokens"]),
            "merges": len(special.merges), "special": dict(special.special_token_ids),
            "add": dict(special.add_special_token), "chat_template": special.chat_template is not None}
