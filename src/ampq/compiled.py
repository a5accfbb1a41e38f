"""Decoding without per-token Python: a static KV cache and one compiled decoding step, as gpt-fast
does (``ampq.compile(model)``).

Eager decoding of a small model spends as long in Python (transformers' module calls, the dynamic
KV cache growing each step, one dispatch per op) as in its matmuls. Here the KV cache is
transformers' ``StaticCache`` (fixed shapes, updated in place), and the decoding step (the whole
model on one token, then the last position's logits) is traced once by ``torch.compile`` with
``fullgraph=True``: on the CPU inductor fuses the norms, rotary embeddings and activations into C++
loops and calls the packed int4/int8 kernels (:mod:`ampq.kernels.cpu`) as extern kernels. The prompt
runs eagerly (its length varies; a compiled prefill would be traced again for each length).

Each call of a compiled function first checks its guards (the tensors' shapes, the modules'
attributes), thousands for a whole model; the step is therefore called with only the guards that
tell its compiled versions apart (``skip_guard_eval_unsafe``), and the decoder itself notices what
would change the model's structure (an adaptive layer switching level: :func:`ampq.adapt`) and
captures the step again on the next call, timing it (:attr:`CompiledDecoder.capture_seconds`).
With ``switchable=True`` the adaptive layers are instead called as one opaque op each
(:meth:`ampq.nested.NestedLinear.make_opaque`), which runs whatever levels the layer holds when it
is called: a switch then needs no capture at all, at the price of one eager call per adaptive layer
and token (``benchmarks/compile_switch.py`` measures both).
Moving or casting the model after compiling it needs :meth:`CompiledDecoder.recompile`.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ampq.attention import use_gqa_attention
from ampq.errors import AmpqError
from ampq.kernels import prepare
from ampq.models import last_logits_only
from ampq.nested import NestedLinear
from ampq.nn import QuantLinear


class CompiledDecoder:
    """Greedy decoding of ``model`` with a static KV cache of ``max_len`` positions for ``batch``
    sequences, the step compiled once (at its first call)."""

    def __init__(self, model: nn.Module, *, max_len: int = 1024, batch: int = 1, cpp_wrapper: bool = False,
                 switchable: bool = False):
        from transformers import StaticCache  # here: transformers stays out of `import ampq`

        if not hasattr(model, "config") or not hasattr(model, "get_output_embeddings"):
            raise AmpqError("ampq.compile takes a transformers causal language model (one that ampq.load or "
                            "ampq.load_model returns)")
        if max_len < 2 or batch < 1:
            raise AmpqError(f"ampq.compile needs max_len >= 2 and batch >= 1; got max_len={max_len}, batch={batch}")
        self.model, self.max_len, self.batch, self.cpp_wrapper = model, max_len, batch, cpp_wrapper
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        if self.device.type == "cpu":
            # a traced step would otherwise copy the KV cache to the query heads' number every layer
            # (on GPUs the copies are cheap and torch's masked GQA kernel is not)
            use_gqa_attention(model)
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self._nested = [m for m in model.modules() if isinstance(m, NestedLinear)]
        self.switchable = switchable
        if switchable:
            for m in self._nested:
                m.make_opaque()
        # the step's inputs live in these two tensors, written in place: whatever tensor a caller
        # passes (a view, another stride), the compiled step sees the same ones
        self._token = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._position = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        self._length = 0  # positions the cache holds
        self._compiled = torch.compile(self._forward_step, fullgraph=True, dynamic=False,
                                       mode="reduce-overhead" if self.device.type == "cuda" else None)
        self._captured: tuple | None = None  # the structure the compiled step was traced for
        self.capture_seconds: list[float] = []  # how long each capture of the step took, in order

    # ---- the compiled step ------------------------------------------------------------------------
    def _forward_step(self, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=token, position_ids=position, cache=self.cache, use_cache=True)
        return out.logits[:, -1]

    def _structure(self) -> tuple:
        return () if self.switchable else tuple(m.level for m in self._nested)

    def _prepare_kernels(self) -> None:
        for m in self.model.modules():
            if isinstance(m, QuantLinear):
                prepare(m, self.batch, self.dtype)

    def recompile(self) -> float:
        """Capture the step again now (after the model moved, was cast or changed precision); the
        seconds it took."""
        self._captured = None
        self.cache.reset()
        self._length = 0
        # a throwaway step at position 0, whose cache entry the next prefill overwrites
        token = torch.zeros(self.batch, 1, dtype=torch.long, device=self.device)
        self._step(token)
        self.cache.reset()
        self._length = 0
        return self.capture_seconds[-1]

    @torch.inference_mode()
    def _step(self, token: torch.Tensor) -> torch.Tensor:
        if self._length >= self.max_len:
            raise AmpqError(f"the static KV cache holds {self.max_len} positions and all are used; "
                            "compile with a larger max_len")
        self._token.copy_(token.view(self.batch, 1))
        self._position.fill_(self._length)
        structure = self._structure()
        if structure != self._captured:
            # with every guard checked, dynamo traces the step again for what changed (and keeps the
            # earlier versions, told apart by the guards that differ between them)
            t0 = time.perf_counter()
            self._prepare_kernels()
            with torch._inductor.config.patch(cpp_wrapper=self.cpp_wrapper):
                logits = self._compiled(self._token, self._position)
            self.capture_seconds.append(time.perf_counter() - t0)
            self._captured = structure
        else:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                logits = self._compiled(self._token, self._position)
        self._length += 1
        return logits

    # ---- decoding ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the prompt ``ids`` (batch x tokens) eagerly into an emptied cache; the logits of its
        last position."""
        ids = ids.to(self.device)
        if ids.dim() != 2 or ids.shape[0] != self.batch:
            raise AmpqError(f"this compiled decoder takes {self.batch} prompt(s) of equal length (a batch x tokens "
                            f"tensor); got shape {tuple(ids.shape)}")
        if ids.shape[1] >= self.max_len:
            raise AmpqError(f"a prompt of {ids.shape[1]} tokens does not fit a static KV cache of {self.max_len} "
                            "positions; compile with a larger max_len")
        self.cache.reset()
        positions = torch.arange(ids.shape[1], device=self.device).expand(self.batch, -1)
        out = self.model(input_ids=ids, position_ids=positions, cache=self.cache, use_cache=True,
                         **last_logits_only(self.model))
        self._length = ids.shape[1]
        return out.logits[:, -1]

    def step(self, token: torch.Tensor) -> torch.Tensor:
        """One compiled decoding step on ``token`` (batch x 1) at the next position; its logits."""
        return self._step(token)

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy continuation of the prompts ``ids`` (batch x tokens): up to ``max_new_tokens`` new
        tokens (batch x new), stopping early where every sequence has produced ``eos_token_id``."""
        if ids.shape[-1] + max_new_tokens > self.max_len:
            raise AmpqError(f"{ids.shape[-1]} prompt tokens + {max_new_tokens} new ones exceed the static KV cache's "
                            f"{self.max_len} positions; compile with max_len >= {ids.shape[-1] + max_new_tokens}")
        token = self.prefill(ids).argmax(-1, keepdim=True)
        new = [token]
        done = token == eos_token_id if eos_token_id is not None else None
        for _ in range(max_new_tokens - 1):
            if done is not None and bool(done.all()):
                break
            token = self.step(token).argmax(-1, keepdim=True)
            new.append(token)
            if done is not None:
                done |= token == eos_token_id
        return torch.cat(new, dim=1)


def compile(model: nn.Module, *, max_len: int = 1024, batch: int = 1, cpp_wrapper: bool = False,
            switchable: bool = False) -> CompiledDecoder:
    """A :class:`CompiledDecoder` for ``model``: ``ampq.compile(model).generate(ids, 40)``;
    ``switchable=True`` for a model whose precision :func:`ampq.adapt` switches while it serves."""
    return CompiledDecoder(model, max_len=max_len, batch=batch, cpp_wrapper=cpp_wrapper, switchable=switchable)
