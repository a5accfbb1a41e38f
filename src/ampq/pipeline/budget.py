"""A budget: how much the quantized model may store, and the choices an allocation under it weighs.

    ampq.Budget(bits=4.25)          # average bits per weight over the quantized linears
    ampq.Budget(bytes="90MB")       # or the size of the whole model on disk

Bits count everything a layer stores (codes, scales, zeros); a size in bytes counts the whole model,
so the bytes that are not linears of the decoder blocks (embeddings, norms, the head) are taken off
first, since the allocation cannot change them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.pipeline.targets import check_target
from ampq.pipeline.transform import TRANSFORMS
from ampq.sensitivity import ESTIMATORS

_SIZE = re.compile(r"^\s*([0-9.]+)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise AmpqError(f"cannot read size {text!r}; write it like 90MB, 1.5GB or 123456789")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


@dataclass(frozen=True)
class Budget:
    """Exactly one of ``bits`` (per weight, over the quantized linears) or ``bytes`` (the whole
    model: an int or a size like "90MB"). ``candidates`` are the FORMAT[:ALGORITHM[+clip]] choices
    per layer (default: :data:`ampq.sensitivity.DEFAULT_CANDIDATES`); ``estimator`` measures the
    damage of each (``fisher``: nats of KL, or ``hessian``); ``tied`` makes q/k/v and gate/up share
    a format; ``sensitivity`` is a table file to reuse or write (default: cached per model,
    candidates and calibration); ``transform`` (``awq``) rescales the float model before any
    candidate is measured, so that the allocation sees what each costs on the weights it will
    quantize (:mod:`ampq.pipeline.transform`), and ``auto`` measures the model both without and with
    each transform and keeps the plan of least estimated damage; ``target`` (``vllm``, ``llama.cpp``) makes the
    candidates the formats that engine serves as stored, so the plan exports unchanged
    (:mod:`ampq.pipeline.targets`; explicit ``candidates`` must be among them); ``embeddings`` stores
    the token embedding table in that format (:mod:`ampq.quant_embedding`), so a size budget leaves
    the bytes it saves to the linears; ``head`` does the same for an untied output head."""

    bits: float | None = None
    bytes: int | str | None = None
    candidates: tuple[str, ...] | None = None
    estimator: str = "fisher"
    tied: bool = True
    sensitivity: str | Path | None = None
    transform: str = "none"
    target: str = "any"
    embeddings: str | None = None
    head: str | None = None

    def __post_init__(self):
        if (self.bits is None) == (self.bytes is None):
            raise AmpqError("give exactly one budget: Budget(bits=4.25) or Budget(bytes='90MB') "
                            "(CLI: --budget 4.25 or --max-size 90MB)")
        if self.bits is not None and not 0 < float(self.bits) <= 32:
            raise AmpqError(f"a budget of {self.bits} bits per weight is not between 0 and 32; give e.g. 4.25")
        if self.bytes is not None:
            object.__setattr__(self, "bytes", parse_size(self.bytes))
        if self.estimator not in ESTIMATORS:
            raise AmpqError(f"unknown sensitivity estimator {self.estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        if self.transform not in (*TRANSFORMS, "auto"):
            raise AmpqError(f"unknown transform {self.transform!r}; choose one of {', '.join(TRANSFORMS)} or auto")
        check_target(self.target)
        for name in (self.embeddings, self.head):
            if name is not None:
                get_format(name)
        if self.embeddings is not None and self.target == "vllm":
            raise AmpqError("vLLM keeps the embedding table in 16 bits, so a plan for it cannot quantize the table; "
                            "drop --embeddings (or plan with --target llama.cpp)")
        if isinstance(self.candidates, str):
            object.__setattr__(self, "candidates", tuple(c for c in self.candidates.split(",") if c.strip()))
        elif self.candidates is not None:
            object.__setattr__(self, "candidates", tuple(self.candidates))

    @property
    def label(self) -> str:
        """How outputs and tables name a model quantized to this budget."""
        return f"ampq-{self.bits}bpw" if self.bits is not None else f"ampq-{self.bytes / 1e6:g}MB"
