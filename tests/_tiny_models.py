"""Tiny random models of each architecture the GGUF export writes, with whole K-quant blocks
(inputs of 256 and 512), and a tiny byte-level BPE tokenizer for them (llama.cpp refuses a GGUF
without a tokenizer)."""

from __future__ import annotations

import json

import torch
import transformers

VOCAB = 320

BASE = {"vocab_size": VOCAB, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64, "max_position_embeddings": 128,
        "tie_word_embeddings": False, "initializer_range": 0.05, "bos_token_id": 0, "eos_token_id": 1}
# transformers class name -> its config's extra keys
ARCHITECTURES = {
    "llama": ("Llama", {}),
    "mistral": ("Mistral", {"sliding_window": None}),
    "qwen2": ("Qwen2", {}),
    "qwen3": ("Qwen3", {}),
    # windows shorter than the 40 tokens run, so that the sliding layers differ from the global ones
    "gemma2": ("Gemma2", {"tie_word_embeddings": True, "sliding_window": 16, "query_pre_attn_scalar": 64,
                          "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0}),
    "gemma3": ("Gemma3Text", {"num_hidden_layers": 6, "sliding_window": 16, "query_pre_attn_scalar": 64,
                              "final_logit_softcapping": 3.0}),
    "gemma3-linear": ("Gemma3Text", {"num_hidden_layers": 6, "sliding_window": 16, "query_pre_attn_scalar": 64,
                                     "rope_parameters": {
                                         "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
    "phi3": ("Phi3", {"partial_rotary_factor": 0.75, "pad_token_id": 2}),
}


def tiny_model(arch: str, seed: int = 0, **overrides):
    prefix, extra = ARCHITECTURES[arch]
    torch.manual_seed(seed)
    config = getattr(transformers, f"{prefix}Config")(**{**BASE, **extra, **overrides})
    model = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")(config).eval()
    with torch.no_grad():  # nonzero biases and norm weights, so that a lost or misplaced one shows
        for name, p in model.named_parameters():
            if name.endswith(".bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def tiny_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer of ``vocab_size`` tokens: 256 bytes, three specials (Qwen2's
    tokenizer class adds <|endoftext|> where it is missing), learned merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<|endoftext|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 8,
                             "a small tokenizer for tests of the export, written once " * 8], trainer)
    assert tok.get_vocab_size() == vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")


def tiny_sentencepiece_tokenizer(vocab_size: int = 400, prepend_space: bool = True):
    """A SentencePiece-style BPE tokenizer as transformers stores Llama 2's, Mistral's, Phi-3's and
    (``prepend_space=False``) Gemma's: ids 0-2 <unk> <s> </s>, 256 byte-fallback tokens <0x00>...,
    then pieces learned on words marked with ▁, no pre-tokenizer, spaces turned into ▁ by the
    normalizer. <s> is added in front of every text."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"]
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    texts = ["the quick brown fox jumps over the lazy dog " * 8,
             "a small tokenizer for tests of the export, written once " * 8, "numbers 12 345 and 6789 "]
    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    learner.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - len(byte_tokens), show_progress=False,
                                                           special_tokens=specials))
    learned = json.loads(learner.to_str())["model"]
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if p not in specials]
    vocab = {t: i for i, t in enumerate(specials + byte_tokens + pieces)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("▁")] if prepend_space else []
    tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     *([decoders.Strip(" ", 1, 0)] if prepend_space else [])])
    tok.add_special_tokens(specials)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
