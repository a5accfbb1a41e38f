"""Speed and memory of a model as it runs: prefill and decode throughput, per-token latency, the
weight bandwidth decoding achieves, and memory predicted against memory measured.

Timings exclude a warm-up run and are medians over repeats. Decoding runs step by step with the KV
cache, as generation does; each step reads every weight once, so the achieved bandwidth is the
bytes of weights read per step divided by the step's time.

With ``compiled=True`` decoding runs as :func:`ampq.compile` runs it (a static KV cache of prompt +
new tokens, the step compiled once per batch size, the prompt eager); the first (warm-up) run
includes the capture, whose seconds the row reports.

Memory predicted: M = P x B / Q summed per tensor kind, P parameters, B bits per parameter as
stored (B = 4.25 for int4-g128 with its scales), Q = 8 bits per byte; plus the KV cache
(2 x layers x batch x tokens x KV heads x head size x bytes). Memory measured: resident memory at the
end of decoding (KV cache alive) minus resident memory before the model was loaded (CPU; includes
allocator and library overhead), or torch.cuda.max_memory_allocated (GPU).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ampq.figures import pyplot
from ampq.atomic import atomic_file
from ampq.errors import AmpqError
from ampq.compiled import CompiledDecoder
from ampq.memory import resident, return_freed_memory
from ampq.models import is_encoder, last_logits_only
from ampq.nn import QuantLinear
from ampq.report import model_bytes


@dataclass
class BenchRow:
    batch: int
    prompt_tokens: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    weight_bytes_per_step: int
    bandwidth_gb_s: float
    predicted_bytes: int
    measured_bytes: int | None
    compile_seconds: float | None = None  # capture of the compiled step (compiled=True), not in the timings

    def as_dict(self) -> dict:
        return asdict(self)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoding step reads: every linear as stored, plus the output head
    (the input embedding reads one row per token: not counted)."""
    seen, total = set(), 0
    for m in model.modules():
        if getattr(m, "is_quantized_embedding", False):
            continue  # a lookup; a head tied to it reads it whole (below)
        if isinstance(getattr(m, "table", None), QuantLinear):  # ampq.quant_embedding.TiedQuantHead
            total += m.table.nbytes()
        elif isinstance(m, QuantLinear):
            total += m.nbytes()
        elif isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            total += m.weight.numel() * m.weight.element_size()
    return total


def kv_cache_bytes(model: nn.Module, batch: int, tokens: int) -> int:
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dtype = next(model.parameters()).dtype
    return 2 * cfg.num_hidden_layers * batch * tokens * heads * head_dim * dtype.itemsize


def predicted_bytes(model: nn.Module, batch: int, tokens: int) -> int:
    return model_bytes(model) + kv_cache_bytes(model, batch, tokens)


def resident_bytes() -> int:
    """Current resident memory of this process (Linux /proc; elsewhere the peak, a coarser stand-in).
    Freed memory that the allocator still holds is handed back first: it would count as resident
    here, and a new allocation would reuse it without growing the figure."""
    return_freed_memory()
    return resident()


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def _run(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], int]:
    """(prefill seconds, decode step seconds, resident bytes at the end) for one generation of
    ``new_tokens`` greedy tokens."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    out = model(ids, use_cache=True, **last_logits_only(model))  # as engines do: the prompt's last logits only
    _sync(device)
    prefill = time.perf_counter() - t0
    # transformers >= 5.2x calls the KV cache `cache`, older versions `past_key_values`
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    past, token = out[key], out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        out = model(token, use_cache=True, **{key: past})
        _sync(device)
        steps.append(time.perf_counter() - t0)
        past, token = out[key], out.logits[:, -1:].argmax(-1)
    return prefill, steps, resident_bytes()


def _run_compiled(decoder: CompiledDecoder, ids: torch.Tensor, new_tokens: int) -> tuple[float, list[float], int]:
    """:func:`_run` through a compiled decoder."""
    device = ids.device
    _sync(device)
    t0 = time.perf_counter()
    token = decoder.prefill(ids).argmax(-1, keepdim=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    steps = []
    for _ in range(new_tokens):
        t0 = time.perf_counter()
        token = decoder.step(token).argmax(-1, keepdim=True)
        _sync(device)
        steps.append(time.perf_counter() - t0)
    return prefill, steps, resident_bytes()


def bench(model: nn.Module, *, batches: tuple[int, ...] = (1, 4, 16), prompt_tokens: int = 128,
          new_tokens: int = 32, repeats: int = 3, baseline_rss: int | None = None, seed: int = 0,
          compiled: bool = False) -> list[BenchRow]:
    if is_encoder(model):
        raise AmpqError(f"bench times generation (prefill and decoding); {type(model).__name__} is an encoder, "
                        "which does not generate")
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(seed)
    rows = []
    step_bytes = weight_bytes(model)
    for batch in batches:
        ids = torch.randint(0, vocab, (batch, prompt_tokens), generator=gen).to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run, compile_seconds = (lambda i, n: _run(model, i, n)), None
        if compiled:
            decoder = CompiledDecoder(model, max_len=prompt_tokens + new_tokens, batch=batch)
            run = lambda i, n: _run_compiled(decoder, i, n)  # noqa: E731
        run(ids, min(new_tokens, 4))  # warm-up: allocator, kernel caches, packed weights, the compiled step
        if compiled:
            compile_seconds = decoder.capture_seconds[0]
        prefills, steps, resident = [], [], 0
        for _ in range(repeats):
            p, s, r = run(ids, new_tokens)
            prefills.append(p)
            steps += s
            resident = max(resident, r)
        step = statistics.median(steps)
        if device.type == "cuda":
            measured = torch.cuda.max_memory_allocated(device)
        elif baseline_rss is not None:
            measured = resident - baseline_rss
        else:
            measured = None
        rows.append(BenchRow(
            batch=batch, prompt_tokens=prompt_tokens, new_tokens=new_tokens,
            prefill_tokens_per_s=batch * prompt_tokens / statistics.median(prefills),
            decode_tokens_per_s=batch / step,
            latency_p50_ms=1e3 * step,
            latency_p99_ms=1e3 * _percentile(steps, 0.99),
            weight_bytes_per_step=step_bytes,
            bandwidth_gb_s=step_bytes / step / 1e9,
            predicted_bytes=predicted_bytes(model, batch, prompt_tokens + new_tokens),
            measured_bytes=measured, compile_seconds=compile_seconds))
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def plot(results: dict[str, list[dict]], path) -> None:
    """Decode tokens/s and latency against batch size, one line per model."""
    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label, rows in results.items():
        xs = [r["batch"] for r in rows]
        a.plot(xs, [r["decode_tokens_per_s"] for r in rows], "o-", label=label)
        b.plot(xs, [r["latency_p50_ms"] for r in rows], "o-", label=label)
    for ax, name in ((a, "decode tokens/s"), (b, "per-step latency p50 (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
