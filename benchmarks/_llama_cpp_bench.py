"""Decode speed of a GGUF file in llama.cpp (llama-cpp-python), measured the way `ampq bench` measures
ampq: a random prompt, then greedy tokens one at a time; prefill tokens/s, and per-token decode times
(median = p50, p99) after a warm-up generation. Batch 1 only (the high-level API runs one sequence).

    python benchmarks/_llama_cpp_bench.py FILE.gguf --json OUT.json [--prompt-tokens 64] [--new-tokens 16]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def last_logits(llm) -> np.ndarray:
    """The logits of the last token evaluated (with logits_all=False llama-cpp-python keeps none)."""
    import llama_cpp

    return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))


def generate(llm, prompt: list[int], new_tokens: int, by_token: bool = False) -> tuple[float, list[float]]:
    llm.reset()
    t0 = time.perf_counter()
    for part in ([[t] for t in prompt] if by_token else [prompt]):
        llm.eval(part)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        token = int(np.argmax(last_logits(llm)))
        t0 = time.perf_counter()
        llm.eval([token])
        steps.append(time.perf_counter() - t0)
    return prefill, steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("gguf")
    p.add_argument("--json", required=True)
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--bits-per-weight", type=float, default=None)
    p.add_argument("--prefill-by-token", action="store_true",
                   help="feed the prompt one token at a time (for a llama.cpp build that fails on multi-token "
                        "batches; the decode figures are unaffected, the prefill ones are then not comparable)")
    args = p.parse_args()
    from _llama import load_llama

    before = rss()
    # without llama.cpp's extra (AMX) buffer types, whose path crashes on multi-token batches on this VM
    llm = load_llama(args.gguf, n_ctx=args.prompt_tokens + args.new_tokens + 8, n_batch=args.prompt_tokens,
                n_threads=args.threads, logits_all=False, verbose=False)  # the last logits only, as ampq
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.n_vocab(), args.prompt_tokens).tolist()
    generate(llm, prompt, min(4, args.new_tokens), args.prefill_by_token)  # warm-up
    prefills, steps = [], []
    for _ in range(args.repeats):
        pre, st = generate(llm, prompt, args.new_tokens, args.prefill_by_token)
        prefills.append(pre)
        steps += st
    step = statistics.median(steps)
    size = os.path.getsize(args.gguf)
    row = {"batch": 1, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
           "prefill_tokens_per_s": args.prompt_tokens / statistics.median(prefills),
           "decode_tokens_per_s": 1 / step, "latency_p50_ms": 1e3 * step,
           "latency_p99_ms": 1e3 * sorted(steps)[min(len(steps) - 1, int(0.99 * len(steps)))],
           "weight_bytes_per_step": size, "bandwidth_gb_s": size / step / 1e9,
           "predicted_bytes": size, "measured_bytes": rss() - before, "prefill_by_token": args.prefill_by_token,
           "extra_buffer_types": False}
    out = {"model": args.gguf, "engine": "llama.cpp", "bits_per_weight": args.bits_per_weight, "device": "cpu",
           "threads": args.threads, "rows": [row]}
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(row))


if __name__ == "__main__":
    main()
