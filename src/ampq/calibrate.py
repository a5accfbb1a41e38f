"""Calibration: run a model block by block on calibration tokens and collect, for each linear, the
statistics that algorithms need (X^T X, per-channel mean and maximum of its inputs).

Only one block's activations are in memory at a time: the inputs of the current block, one per
batch. Each block is fed the outputs of the previous block *after* that block was quantized, so
later layers correct for the error of earlier ones. Within a block, linears are grouped by the input
they share (q/k/v, gate/up, ...) and handled in the order they run, each group measured after the
groups before it were quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.kernels import dequantized_weights_cached
from ampq.models import decoder_blocks
from ampq.spill import ActivationStore


@dataclass
class LayerStats:
    """What calibration saw at the input of one linear."""

    xtx: torch.Tensor  # (in, in) float32: sum over tokens of x x^T
    sum: torch.Tensor  # (in,) float64
    absmax: torch.Tensor  # (in,) float32
    count: int
    cache: dict = field(default_factory=dict, repr=False)  # what algorithms derive from these statistics

    @property
    def hessian(self) -> torch.Tensor:
        """The GPTQ Hessian of the layer's squared output error, 2 X^T X / n."""
        return self.xtx * (2.0 / self.count)

    @property
    def mean(self) -> torch.Tensor:
        return (self.sum / self.count).float()

    def add(self, x: torch.Tensor) -> None:
        self.cache.clear()
        x = x.reshape(-1, x.shape[-1]).float()
        self.xtx.addmm_(x.t(), x)
        self.sum += x.sum(0, dtype=torch.float64)
        torch.maximum(self.absmax, x.abs().amax(0), out=self.absmax)
        self.count += x.shape[0]

    @classmethod
    def empty(cls, features: int, device) -> "LayerStats":
        return cls(torch.zeros(features, features, device=device), torch.zeros(features, dtype=torch.float64, device=device),
                   torch.zeros(features, device=device), 0)


# an expert the router sent fewer calibration tokens is rounded to nearest rather than given GPTQ
# or clip search: a Hessian of a handful of tokens fits the error feedback to those tokens alone
MIN_EXPERT_TOKENS = 32


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs were seen."""


class Calibration:
    """Block inputs for a set of calibration windows, advanced block by block."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, store: ActivationStore | None = None):
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise AmpqError("calibration needs at least one window of tokens")
        self.model = model
        self.blocks = decoder_blocks(model)
        self.device = model.get_input_embeddings().weight.device if hasattr(model, "get_input_embeddings") else (
            next(model.parameters()).device)
        # one tensor per batch; a store with a byte limit spills the rest to disk (--max-memory)
        self.inputs = store if store is not None else ActivationStore()
        self.kwargs: list[dict] = []
        self._capture(tokens, batch_size)

    @torch.inference_mode()
    def _capture(self, tokens: torch.Tensor, batch_size: int) -> None:
        first = self.blocks[0][1]

        def catch(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.inputs.append(hidden.detach())
            self.kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
            raise _Stop

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for start in range(0, tokens.shape[0], batch_size):
                try:
                    self.model(tokens[start:start + batch_size].to(self.device), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if len(self.inputs) != -(-tokens.shape[0] // batch_size):
            raise AmpqError("could not capture the first block's inputs; is this a decoder-only language model?")

    def _run(self, block: nn.Module, i: int) -> torch.Tensor:
        out = block(self.inputs[i], **self.kwargs[i])
        return out[0] if isinstance(out, tuple) else out

    @torch.inference_mode()
    @dequantized_weights_cached()
    def groups(self, block: nn.Module) -> list[list[str]]:
        """Names (relative to the block) of its linears, grouped by shared input, in run order."""
        seen: list[tuple[str, torch.Tensor]] = []
        handles = [m.register_forward_pre_hook(lambda mod, args, n=n: seen.append((n, args[0])))
                   for n, m in block.named_modules() if isinstance(m, nn.Linear)]
        try:
            self._run(block, 0)
        finally:
            for h in handles:
                h.remove()
        groups: list[list[str]] = []
        last = None
        for name, x in seen:
            if any(name in g for g in groups):
                continue  # a linear called twice keeps its first place
            if last is not None and x is last:
                groups[-1].append(name)
            else:
                groups.append([name])
            last = x
        return groups

    @torch.inference_mode()
    @dequantized_weights_cached()
    def visit_inputs(self, block: nn.Module, name: str, visit) -> None:
        """Call ``visit(x)`` with the input of linear ``name`` on every batch; each forward pass
        stops as soon as that input exists."""

        def record(mod, args):
            visit(args[0])
            raise _Stop

        handle = block.get_submodule(name).register_forward_pre_hook(record)
        try:
            for i in range(len(self.inputs)):
                try:
                    self._run(block, i)
                except _Stop:
                    pass
        finally:
            handle.remove()

    def stats(self, block: nn.Module, names: list[str]) -> LayerStats:
        """Input statistics shared by the linears ``names`` (one input), measured on every batch."""
        acc = LayerStats.empty(block.get_submodule(names[0]).in_features, self.device)
        self.visit_inputs(block, names[0], acc.add)
        return acc

    @torch.inference_mode()
    @dequantized_weights_cached()
    def stats_all(self, block: nn.Module, groups: list[list[str]], advance: bool = False) -> dict[str, LayerStats]:
        """Every group's statistics from one pass per batch, keyed by the group's first linear;
        with ``advance``, the same pass also replaces the inputs by the block's outputs (right when
        nothing in the block changes before the next block: sensitivity measures the unquantized model)."""
        acc = {g[0]: LayerStats.empty(block.get_submodule(g[0]).in_features, self.device) for g in groups}
        handles = [block.get_submodule(name).register_forward_pre_hook(lambda mod, args, s=stats: s.add(args[0]))
                   for name, stats in acc.items()]
        try:
            if advance:
                for i in range(len(self.inputs)):
                    self.inputs[i] = self._run(block, i)
            else:
                last = groups[-1][0]
                self.visit_inputs(block, last, lambda x: None)  # stops at the last group's input
        finally:
            for h in handles:
                h.remove()
        return acc

    @torch.inference_mode()
    @dequantized_weights_cached()
    def expert_stats(self, block: nn.Module, name: str, projection: str) -> dict[int, LayerStats]:
        """Input statistics of each expert's ``projection`` in the experts module ``name`` (a
        :class:`ampq.quant_experts.QuantExperts`), from the tokens routed to it, by expert index;
        an expert no token reached is absent. Each pass stops after the experts module."""
        experts = block.get_submodule(name)
        acc: dict[int, LayerStats] = {}

        def observe(proj: str, e: int, x: torch.Tensor) -> None:
            if proj == projection:
                if e not in acc:
                    acc[e] = LayerStats.empty(x.shape[-1], self.device)
                acc[e].add(x)

        def stop(module, args, output):
            raise _Stop

        experts.observer = observe
        handle = experts.register_forward_hook(stop)
        try:
            for i in range(len(self.inputs)):
                try:
                    self._run(block, i)
                except _Stop:
                    pass
        finally:
            experts.observer = None
            handle.remove()
        return acc

    def restore_inputs(self, tensors) -> None:
        """Put back the inputs a killed run recorded (one per batch, in order)."""
        count = 0
        for count, t in enumerate(tensors, 1):
            if count > len(self.inputs):
                break
            self.inputs[count - 1] = t
        if count != len(self.inputs):
            raise AmpqError("the recorded calibration inputs do not match this run's batches; delete the progress "
                            "folder and run again")

    def stats_and_advance(self, block: nn.Module, groups: list[list[str]]) -> dict[str, LayerStats]:
        return self.stats_all(block, groups, advance=True)

    @torch.inference_mode()
    @dequantized_weights_cached()
    def advance(self, block: nn.Module) -> None:
        """Replace the stored inputs by the (quantized) block's outputs: the next block's inputs
        (batch by batch, in place: a batch's input is not needed once its output exists)."""
        for i in range(len(self.inputs)):
            self.inputs[i] = self._run(block, i)
