"""Calibration: run a model block by block on calibration tokens and collect, for each linear, the
statistics that algorithms need (X^T X, per-channel mean and maximum of its inputs).

Only one block's activations are in memory at a time: the inputs of the current block, one per
batch. Each block is fed the outputs of the previous block *after* that block was quantized, so
later layers correct for the error of earlier ones. Within a block, linears are grouped by the input
they share (q/k/v, gate/up, ...) and handled in the order they run, each group measured after the
groups before it were quantized.

The passes that gather statistics multiply in bf16 where the hardware does so natively (a GPU with
bf16 support, a CPU with AMX or AVX512-BF16), as calibration of a bf16 model on a GPU always does:
those passes are most of the time of GPTQ and of the sensitivity measurement, and bf16 runs them
several times faster there. The statistics themselves (X^T X, sums) are accumulated in float32
from what the layer received. ``AMPQ_CALIB_DTYPE=float32`` (or ``bfloat16``) decides instead;
:func:`autocast_dtype` says what a device gets.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.kernels import dequantized_weights_cached
from ampq.kernels.cpu_bf16 import native as cpu_multiplies_bf16
from ampq.models import decoder_blocks
from ampq.placement import Placement
from ampq.ranks import Ranks
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
        """Add one batch of inputs: its own sums first, then added to the totals, the same
        arithmetic however the batches are spread over ranks (:meth:`partial`, :meth:`fold`)."""
        self.fold(self.partial(x))

    @staticmethod
    def partial(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One batch's (x^T x, sum, absmax, count), in float32 also inside a bf16 statistics pass."""
        x = x.reshape(-1, x.shape[-1]).float()
        count = torch.tensor([x.shape[0]], dtype=torch.float64, device=x.device)
        with torch.autocast(x.device.type, enabled=False):
            return x.t() @ x, x.sum(0, dtype=torch.float64), x.abs().amax(0), count

    def fold(self, partial, ranks: Ranks | None = None) -> None:
        """Add one round of batches, this rank's ``partial`` (None: no batch this round) and, under
        several ranks, the others', in batch order."""
        self.cache.clear()
        count = torch.tensor([float(self.count)], dtype=torch.float64, device=self.xtx.device)
        totals = [self.xtx, self.sum, count]
        mine = None if partial is None else [partial[0], partial[1], partial[3]]
        (ranks or Ranks()).fold(totals, mine)
        if partial is not None:
            torch.maximum(self.absmax, partial[2], out=self.absmax)
        self.count = int(count.item())

    @classmethod
    def empty(cls, features: int, device) -> "LayerStats":
        return cls(torch.zeros(features, features, device=device), torch.zeros(features, dtype=torch.float64, device=device),
                   torch.zeros(features, device=device), 0)


# an expert the router sent fewer calibration tokens is rounded to nearest rather than given GPTQ
# or clip search: a Hessian of a handful of tokens fits the error feedback to those tokens alone
MIN_EXPERT_TOKENS = 32


CALIB_DTYPES = {"float32": None, "bfloat16": torch.bfloat16}


def autocast_dtype(device: torch.device | str) -> torch.dtype | None:
    """The dtype the statistics passes multiply in on ``device`` (None: the model's own)."""
    device = torch.device(device)
    forced = os.environ.get("AMPQ_CALIB_DTYPE", "auto")
    if forced != "auto":
        if forced not in CALIB_DTYPES:
            raise AmpqError(f"AMPQ_CALIB_DTYPE={forced!r} is not one of auto, {', '.join(CALIB_DTYPES)}")
        return CALIB_DTYPES[forced] if device.type in ("cpu", "cuda") else None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if device.type == "cpu":
        return torch.bfloat16 if cpu_multiplies_bf16() else None
    return None


class _Stop(Exception):
    """Raised from a hook to end a forward pass once the wanted inputs were seen."""


class Calibration:
    """Block inputs for a set of calibration windows, advanced block by block.

    With a :class:`~ampq.placement.Placement`, blocks run on its device (the caller moves each one
    there, :meth:`on_device`) and, under several ranks, each rank keeps and runs only its own
    batches (``self.batches``: batch ``b`` of all goes to rank ``b % world``); statistics are summed
    over all of them in batch order, so every rank gets the same bits as one process would."""

    def __init__(self, model: nn.Module, tokens: torch.Tensor, batch_size: int = 8, store: ActivationStore | None = None,
                 placement: Placement | None = None):
        if tokens.dim() != 2 or tokens.shape[0] == 0:
            raise AmpqError("calibration needs at least one window of tokens")
        self.model = model
        self.blocks = decoder_blocks(model)
        self.placement = placement or Placement(_model_device(model))
        self.ranks = self.placement.ranks
        self.device = self.placement.device
        self.count = -(-tokens.shape[0] // batch_size)  # batches over all ranks
        self.batches = self.ranks.batches(self.count)
        # one tensor per batch of this rank; a store with a byte limit spills the rest to disk (--max-memory)
        self.inputs = store if store is not None else self.placement.activation_store()
        self.kwargs: list[dict] = []
        self.autocast = autocast_dtype(self.device)
        self._capture(tokens, batch_size)

    def on_device(self):
        """Each decoder block as (prefix, block), moved to the device for the caller's work on it
        and back once the caller asks for the next."""
        for prefix, block in self.blocks:
            with self.placement.onload(block):
                yield prefix, block

    @torch.inference_mode()
    def _capture(self, tokens: torch.Tensor, batch_size: int) -> None:
        first = self.blocks[0][1]
        home = _model_device(self.model)  # what runs before the first block runs where the model is

        def catch(module, args, kwargs):
            hidden = args[0] if args else kwargs.pop("hidden_states")
            self.inputs.append(hidden.detach().to(self.device))
            self.kwargs.append(self.placement.to_device({k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Stop

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        try:
            for b in self.batches:
                try:
                    self.model(tokens[b * batch_size:(b + 1) * batch_size].to(home), use_cache=False)
                except _Stop:
                    pass
        finally:
            handle.remove()
        if len(self.inputs) != len(self.batches):
            raise AmpqError("could not capture the first block's inputs; is this a decoder-only language model?")

    def fast(self):
        """A context in which the statistics passes run: autocast to :attr:`autocast` where it is set."""
        return torch.autocast(self.device.type, self.autocast) if self.autocast else contextlib.nullcontext()

    def _run(self, block: nn.Module, i: int, fast: bool = False) -> torch.Tensor:
        """Block ``block`` on batch ``i``; ``fast``: in :attr:`autocast`'s dtype (the statistics
        passes; AWQ's checks that a fold keeps the block's function compare float32 outputs)."""
        x = self.inputs[i]  # read once: a store under --max-memory reads a spilled batch from disk
        with self.fast() if fast else contextlib.nullcontext():
            out = block(x, **self.kwargs[i])
        out = out[0] if isinstance(out, tuple) else out
        return out.to(x.dtype) if fast else out

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
        """Call ``visit(x)`` with the input of linear ``name`` on every batch of this rank; each
        forward pass stops as soon as that input exists."""
        for i in range(len(self.inputs)):
            self._visit(block, name, i, visit)

    def _visit(self, block: nn.Module, name: str, i: int, visit, fast: bool = False) -> None:
        def record(mod, args):
            visit(args[0])
            raise _Stop

        handle = block.get_submodule(name).register_forward_pre_hook(record)
        try:
            self._run(block, i, fast)
        except _Stop:
            pass
        finally:
            handle.remove()

    def stats(self, block: nn.Module, names: list[str]) -> LayerStats:
        """Input statistics shared by the linears ``names`` (one input), measured on every batch."""
        return self.stats_all(block, [names])[names[0]]

    @torch.inference_mode()
    @dequantized_weights_cached()
    def stats_all(self, block: nn.Module, groups: list[list[str]], advance: bool = False) -> dict[str, LayerStats]:
        """Every group's statistics from one pass per batch, keyed by the group's first linear;
        with ``advance``, the same pass also replaces the inputs by the block's outputs (right when
        nothing in the block changes before the next block: sensitivity measures the unquantized model).
        Batch by batch, in rounds of one batch per rank, each round's sums added in batch order."""
        acc = {g[0]: LayerStats.empty(block.get_submodule(g[0]).in_features, self.device) for g in groups}
        partials: dict[str, tuple] = {}
        handles = [block.get_submodule(name).register_forward_pre_hook(
            lambda mod, args, n=name: partials.__setitem__(n, LayerStats.partial(args[0]))) for name in acc]
        try:
            for k in range(self.ranks.rounds(self.count)):
                partials.clear()
                if k < len(self.inputs):
                    if advance:
                        self.inputs[k] = self._run(block, k, fast=True)
                    else:  # stops at the last group's input
                        self._visit(block, groups[-1][0], k, lambda x: None, fast=True)
                for name, stats in acc.items():
                    stats.fold(partials.get(name), self.ranks)
        finally:
            for h in handles:
                h.remove()
        self.ranks.fold_max([s.absmax for s in acc.values()])
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

    def restore_inputs(self, recorded) -> None:
        """Put back the inputs a killed run recorded: (batch index, stored bytes) of every batch,
        in order, of which this rank takes its own."""
        recorded = dict(recorded)
        if sorted(recorded) != list(range(self.count)):
            raise AmpqError("the recorded calibration inputs do not match this run's batches; delete the progress "
                            "folder and run again")
        for i, b in enumerate(self.batches):
            self.inputs[i] = recorded[b].read().to(self.device)

    def stats_and_advance(self, block: nn.Module, groups: list[list[str]]) -> dict[str, LayerStats]:
        return self.stats_all(block, groups, advance=True)

    @torch.inference_mode()
    @dequantized_weights_cached()
    def advance(self, block: nn.Module) -> None:
        """Replace the stored inputs by the (quantized) block's outputs: the next block's inputs
        (batch by batch, in place: a batch's input is not needed once its output exists)."""
        for i in range(len(self.inputs)):
            self.inputs[i] = self._run(block, i, fast=True)


def _model_device(model: nn.Module) -> torch.device:
    if hasattr(model, "get_input_embeddings"):
        return model.get_input_embeddings().weight.device
    return next(model.parameters()).device
