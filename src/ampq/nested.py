"""Nested storage: one linear held at several precisions at once, as a base code plus residual codes.

Level 0 is the base, the layer quantized directly (GPTQ int4-g128, say). Level k adds the k-th
residual code: the error the levels below leave, W - deq(level k-1), quantized (by GPTQ against the
layer's Hessian where calibration is given) in a small symmetric integer format, so y = base(x) + r1(x) + ... + rk(x). Each level is therefore exactly as
good as its base plus refinements, the base exactly as good as quantizing to it directly, and
dropping a residual frees its bytes (benchmarks/adapt.py measured the alternative, bit planes of one
high-precision code, and why it lost: see the README's runtime adaptation section).

Residuals that are not in memory come back from the checkpoint the layer was loaded from (its
:class:`ResidualSource`, :class:`ampq.io.residuals.CheckpointResiduals`) or, for a model adapted in
the process that quantized it, from host memory.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch
from torch import nn

from ampq.algorithms import get_algorithm
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.nn import QuantLinear


class ResidualSource(Protocol):
    """Where a layer loaded from a checkpoint reads a residual level back from."""

    def read(self, k: int, nbytes: int) -> dict[str, torch.Tensor]:
        """The stored tensors of residual ``k`` (1: the first), by role; an AmpqError where they
        are missing, damaged or do not hold ``nbytes`` bytes."""

    def part(self, suffix: str) -> "ResidualSource":
        """The source of the layer ``<this layer>.<suffix>`` (one expert of an expert projection)."""


def residual_formats(levels: list[int], base_format: str) -> list[str]:
    """The residual formats that take a ``levels[0]``-bit base to each following bit width: for
    [4, 8], one int4 residual; for [3, 5, 8], an int2 then an int3 residual. Groups as the base's.
    Symmetric, so that zero is a code: an element the level below got right stays right, and no
    level is worse than the one below it (an asymmetric grid made some layers worse: its nearest
    level to a zero residual can be half a step away)."""
    fmt = get_format(base_format)
    group = fmt.group_size if fmt.group_size else 128
    out = []
    for lo, hi in zip(levels, levels[1:]):
        if not 2 <= hi - lo <= 8:
            raise AmpqError(f"adaptive levels {':'.join(map(str, levels))}: each step must add 2 to 8 bits "
                            f"({lo} to {hi} adds {hi - lo}); write them like 4:8 or 3:5:8")
        out.append(f"int{hi - lo}-g{group}-sym")
    return out


def parse_levels(text: str) -> list[int]:
    try:
        levels = [int(p) for p in str(text).split(":")]
    except ValueError:
        raise AmpqError(f"--adaptive takes bit widths separated by colons, like 4:8 or 3:5:8; got {text!r}") from None
    if len(levels) < 2 or levels != sorted(set(levels)) or not 2 <= levels[0] <= 8:
        raise AmpqError(f"--adaptive {text}: give increasing bit widths from 2 to 16, like 4:8 or 3:5:8")
    return levels


class NestedLinear(nn.Module):
    """A linear at ``level`` of the precisions it stores: the base QuantLinear plus the first
    ``level`` residual QuantLinears (no bias; the base carries it)."""

    is_quantized_linear = True

    def __init__(self, base: QuantLinear, formats: list[str], residuals: list[QuantLinear],
                 damage: list[float] | None = None, source: ResidualSource | None = None):
        super().__init__()
        if base.input_scale is not None or base.activation is not None or base.input_perm is not None:
            raise AmpqError("adaptive layers need a plain weight-only base (gptq or rtn), not AWQ's input scales "
                            "or quantized activations, nor an act-order input permutation")
        self.base = base
        self.residual_formats = list(formats)
        self.residuals = nn.ModuleList(residuals)
        # estimated damage of each level (KL nats per token with the Fisher estimator), for adapt()
        self.damage = list(damage) if damage is not None else None
        # level -> QuantLinear dropped in this process, when no checkpoint has it (a plain dict, not
        # submodules: what is held aside is not part of the model's state or its device moves)
        self.__dict__["spare"] = {}
        self.__dict__["_source"] = source

    # ---- the QuantLinear surface that reports and savers read -------------------------------------
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def shape(self) -> tuple[int, int]:
        return self.base.shape

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def bias(self):
        return self.base.bias

    @property
    def format_name(self) -> str:
        return "+".join([self.base.format_name, *self.residual_formats[: self.level]])

    @property
    def algorithm(self) -> str:
        return self.base.algorithm

    @property
    def level(self) -> int:
        return len(self.residuals)

    @property
    def levels(self) -> int:
        return 1 + len(self.residual_formats)

    def level_bytes(self, level: int) -> int:
        shape = self.shape
        return self.base.nbytes() + sum(get_format(f).nbytes(shape) for f in self.residual_formats[:level])

    def nbytes(self) -> int:
        return self.level_bytes(self.level)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        w = self.base.dequantize(torch.float32)
        for r in self.residuals:
            w = w + r.dequantize(torch.float32)
        return w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.opaque is not None and torch.compiler.is_compiling():
            return torch.ops.ampq.nested_linear(x, self.opaque)
        y = self.base(x)
        for r in self.residuals:
            y = y + r(x)
        return y

    # ---- opaque to torch.compile ------------------------------------------------------------------
    opaque: int | None = None  # the layer's key in _OPAQUE while a compiled step calls it as one op

    def make_opaque(self) -> None:
        """From now on a compiled graph calls this layer as one opaque op (``ampq::nested_linear``)
        that runs whatever levels it holds at call time, so switching level needs no new capture;
        the price is one eager call per layer and token."""
        if self.opaque is None:
            self.opaque = next(_KEYS)
            _OPAQUE[self.opaque] = self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, base={self.base.format_name}, "
                f"residuals={self.residual_formats}, level={self.level}")

    # ---- switching --------------------------------------------------------------------------------
    def set_level(self, level: int) -> None:
        """Drop residuals above ``level`` (freeing them) or bring the missing ones back."""
        if not 0 <= level < self.levels:
            raise AmpqError(f"level {level} is not stored: this layer holds levels 0 to {self.levels - 1}")
        while self.level > level:
            k = self.level
            dropped = self.residuals[-1]
            del self.residuals[-1]
            if self._source is None:
                self.spare[k] = dropped  # nothing to re-read it from: keep it off the model, in host memory
        while self.level < level:
            k = self.level + 1
            layer = self.spare.pop(k, None)
            if layer is None:
                layer = self._read_residual(k)
            self.residuals.append(layer.to(self.base.codes.device))

    def _read_residual(self, k: int) -> QuantLinear:
        if self._source is None:
            raise AmpqError(f"residual {k} of this layer is neither loaded nor in a checkpoint; load the model "
                            "from its adaptive checkpoint to switch up")
        fmt = self.residual_formats[k - 1]
        stored = self._source.read(k, get_format(fmt).nbytes(self.shape))
        return QuantLinear(self.in_features, self.out_features, fmt, stored, None, "rtn")


@torch.no_grad()
def nest(base: QuantLinear, weight: torch.Tensor, formats: list[str], stats=None) -> list[QuantLinear]:
    """Residual layers refining ``base`` towards ``weight``, one per format, each of the error left.

    With calibration ``stats`` each residual is chosen by GPTQ against the layer's Hessian: a GPTQ
    base's error is shaped so that it mostly cancels in the output, and rounding the residual to
    nearest breaks that shape (on one SmolLM2 layer the estimated damage tripled instead of
    falling); GPTQ on the residual keeps every level's output error below the one beneath it."""
    weight = weight.detach().float()
    approx = base.dequantize(torch.float32)
    out = []
    for fmt_name in formats:
        fmt = get_format(fmt_name)
        if stats is not None:
            codes, params = get_algorithm("gptq")(weight - approx, fmt, stats)
        else:
            codes, params = fmt.quantize_codes(weight - approx)
        algorithm = "gptq" if stats is not None else "rtn"
        layer = QuantLinear(base.in_features, base.out_features, fmt_name, fmt.pack(codes, params), None, algorithm)
        approx = approx + fmt.dequantize_codes(codes, params.values)
        out.append(layer)
    return out


# opaque layers by key; weak, so that a compiled graph's constant key never keeps a layer alive
_OPAQUE: "weakref.WeakValueDictionary[int, NestedLinear]" = weakref.WeakValueDictionary()
_KEYS = itertools.count(1)


@torch.library.custom_op("ampq::nested_linear", mutates_args=())
def _nested_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    module = _OPAQUE.get(layer)
    if module is None:
        raise AmpqError("a compiled step called an adaptive layer that no longer exists; compile the model again")
    y = module.base(x)
    for r in module.residuals:
        y = y + r(x)
    return y


@_nested_linear.register_fake
def _(x: torch.Tensor, layer: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _OPAQUE[layer].out_features)
