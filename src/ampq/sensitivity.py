"""Sensitivity: for every linear x candidate (format + algorithm), an estimate of the damage that
quantizing that linear alone in that candidate does to the model.

The Hessian estimator needs no extra forward passes: with H = 2 X^T X / n from calibration inputs of
the *unquantized* model, the damage is tr(dW H dW^T), dW = W - Q(W), i.e. twice the mean squared
error the layer's output suffers. Tables are saved as JSON and reused: a new budget only re-solves
the allocation.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.algorithms import get_algorithm
from ampq.algorithms.clip import search_clip
from ampq.errors import AmpqError
from ampq.formats import get_format

# One per family, each with the algorithm that serves it best (issue #5's default set).
DEFAULT_CANDIDATES = [
    "int3-g128:gptq", "int3-g64:gptq", "int4-g128:gptq", "int4-g64:gptq", "nf4-b64-dq:gptq",
    "int5-g128:gptq", "int6-g128:gptq", "fp8-e4m3-ch:rtn", "int8-ch:rtn", "bf16",
]


@dataclass(frozen=True)
class Candidate:
    """A format with the algorithm that produces it, written ``int4-g128:gptq`` (``+clip`` adds clip
    search); ``bf16`` keeps the layer in 16 bits, the ceiling of any allocation."""

    format: str
    algorithm: str = "rtn"
    clip: bool = False

    @property
    def name(self) -> str:
        if self.format in ("bf16", "fp16"):
            return self.format
        return f"{self.format}:{self.algorithm}" + ("+clip" if self.clip else "")

    @classmethod
    def parse(cls, text: str) -> "Candidate":
        fmt, _, algo = text.strip().partition(":")
        clip = algo.endswith("+clip")
        cand = cls(fmt, algo.removesuffix("+clip") or "rtn", clip)
        get_format(fmt)
        get_algorithm(cand.algorithm)
        return cand

    def nbytes(self, shape: tuple[int, int]) -> int:
        return get_format(self.format).nbytes(shape)

    def dequantized(self, weight: torch.Tensor, stats) -> torch.Tensor:
        fmt = get_format(self.format)
        ratios = search_clip(weight, fmt, stats) if self.clip else 1.0
        codes, params = get_algorithm(self.algorithm)(weight, fmt, stats, ratios)
        return fmt.dequantize_codes(codes, params.values)


@dataclass
class SensitivityTable:
    estimator: str
    candidates: list[str]
    damage: dict[str, dict[str, float]]  # layer -> candidate -> damage
    nbytes: dict[str, dict[str, int]]  # layer -> candidate -> exact bytes
    shapes: dict[str, list[int]]
    source: str | None = None
    calibration: dict = field(default_factory=dict)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise AmpqError(f"{path} is not a sensitivity table written by ampq ({str(e).splitlines()[0][:120]})") from None


def hessian_damage(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    dw = weight.float() - dequantized.float()
    return float(((dw @ hessian.float()) * dw).sum())


@torch.inference_mode()
def measure(model: nn.Module, calibration, candidates: list[str] | None = None, *, batch_size: int = 8,
            progress: bool = True) -> SensitivityTable:
    """The Hessian estimate for every linear of the decoder blocks x every candidate, from one
    block-by-block pass over the calibration windows of the unquantized model."""
    from ampq.calibrate import Calibration

    cands = [Candidate.parse(c) for c in (candidates or DEFAULT_CANDIDATES)]
    tokens = getattr(calibration, "tokens", calibration)
    cal = Calibration(model, tokens, batch_size)
    damage: dict[str, dict[str, float]] = {}
    nbytes: dict[str, dict[str, int]] = {}
    shapes: dict[str, list[int]] = {}
    for prefix, block in tqdm(cal.blocks, desc="sensitivity", unit="block", disable=not progress):
        for group in cal.groups(block):
            stats = cal.stats(block, group)
            hessian = stats.hessian
            for sub in group:
                name = f"{prefix}.{sub}"
                weight = block.get_submodule(sub).weight.detach().float()
                shape = (weight.shape[0], weight.shape[1])
                shapes[name] = list(shape)
                damage[name], nbytes[name] = {}, {}
                for cand in cands:
                    try:
                        deq = cand.dequantized(weight, stats)
                    except ValueError:
                        continue  # a format this layer cannot take is simply not a choice for it
                    damage[name][cand.name] = hessian_damage(weight, deq, hessian)
                    nbytes[name][cand.name] = cand.nbytes(shape)
        cal.advance(block)
    return SensitivityTable("hessian", [c.name for c in cands], damage, nbytes, shapes,
                            getattr(model.config, "ampq_source", None),
                            {"windows": int(tokens.shape[0]), "window": int(tokens.shape[1])})
