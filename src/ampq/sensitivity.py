"""Sensitivity: for every linear x candidate (format + algorithm), an estimate of the damage that
quantizing that linear alone in that candidate does to the model. A mixture-of-experts block's
3D expert weights are one row each (:mod:`ampq.pipeline.expert_damage`); routers are not measured.

Two estimators, computed in the same pass:

- ``hessian``: with H = 2 X^T X / n from calibration inputs of the *unquantized* model, the damage
  is tr(dW H dW^T), dW = W - Q(W), twice the mean squared error of the layer's output. No extra
  forward passes, but each layer in its own output units.
- ``fisher``: the same row errors (dW H dW^T)_ii weighted by the Fisher information of each output
  channel (:mod:`ampq.fisher`, a few backward passes): an estimate of the KL to the original in nats
  per token, comparable across layers. The default, chosen by measurement (benchmarks/sensitivity.py:
  rank correlation with the KL measured with one layer quantized at a time).

Tables are saved as JSON and reused: a new budget only re-solves the allocation.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.algorithms import get_algorithm
from ampq.algorithms.gptq import SWEEP_BYTES, gptq_many
from ampq.algorithms.clip import search_clip
from ampq.calibrate import Calibration
from ampq.errors import AmpqError
from ampq.experts import is_router
from ampq.fisher import fisher_damage, output_fisher
from ampq.formats import get_format
from ampq import atomic
from ampq.placement import Placement
from ampq.pipeline.expert_damage import expert_projection_names, measure_experts
from ampq.report import block_linear_names
from ampq.ranks import merge_by_name, owned_linears

# Decided by benchmarks/quality.py across models (docs/mixed-precision.md, "Across models"): the
# integer layouts with a minimum (GGUF's) and with an exact zero (symmetric, or integer zero points:
# what vLLM and GPTQ/AWQ checkpoints store), side by side, so the allocator measures which one each
# layer takes instead of assuming; NF4, FP8, int8 both ways, 16 bits. No 2-bit candidate: the summed
# estimate under-rates 2-bit layers most (the errors compound), and no plan at 3.5 bits or more
# gained from them.
# The layouts with a minimum and with an exact zero that any plan of the quality table chose
# (docs/mixed-precision.md, "The defaults, and why"); the other int4 layouts, FP8 and int8-ch-sym
# were never chosen there, and leaving them out measures sensitivity in two thirds of the time
DEFAULT_CANDIDATES = [
    "int3-g128:gptq", "int3-g128-zp:gptq", "int3-g64-zp:gptq", "int4-g32:gptq", "nf4-b64-dq:gptq",
    "int5-g128:gptq", "int5-g128-zp:gptq", "int6-g128:gptq", "int6-g128-sym:gptq", "int8-ch:rtn", "bf16",
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
    estimates: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # every estimator measured

    def save(self, path: str | Path) -> None:
        atomic.write_text(path, json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "SensitivityTable":
        try:
            data = json.loads(Path(path).read_text())
            return cls(**data)
        except (OSError, ValueError, TypeError) as e:
            raise AmpqError(f"{path} is not a sensitivity table written by ampq ({str(e).splitlines()[0][:120]})") from None


def row_errors(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """(dW H dW^T)_ii for every output row i: the Hessian damage is their sum."""
    dw = weight.float() - dequantized.float()
    return ((dw @ hessian.float()) * dw).sum(1)


def hessian_damage(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    return float(row_errors(weight, dequantized, hessian).sum())


ESTIMATORS = ("fisher", "hessian")


def _dequantized_candidates(weights: dict[str, torch.Tensor], cands: list[Candidate], stats):
    """(layer, candidate, dequantized weight) for the layers sharing ``stats`` x every candidate
    that can take them. The GPTQ candidates of all these layers run in shared column sweeps
    (:func:`ampq.algorithms.gptq.gptq_many`)."""
    sweep = []
    for name, weight in weights.items():
        for cand in cands:
            fmt = get_format(cand.format)
            if cand.algorithm == "gptq" and fmt.name not in ("bf16", "fp16"):
                sweep.append((name, cand, fmt))
                continue
            try:
                yield name, cand, cand.dequantized(weight, stats)
            except ValueError:
                continue  # a format this layer cannot take is simply not a choice for it
    while sweep:  # one sweep's worth at a time, so only its results are held
        size, chunk = 0, []
        while sweep and (not chunk or size + weights[sweep[0][0]].numel() * 4 <= SWEEP_BYTES):
            chunk.append(sweep.pop(0))
            size += weights[chunk[-1][0]].numel() * 4
        jobs = [(weights[name], fmt, search_clip(weights[name], fmt, stats) if cand.clip else 1.0)
                for name, cand, fmt in chunk]
        for (name, cand, _), solved in zip(chunk, gptq_many(jobs, stats)):
            if solved is not None:
                yield name, cand, solved.dequantized


@torch.inference_mode()
def measure(model: nn.Module, calibration, candidates: list[str] | None = None, *, estimator: str = "fisher",
            gradient_windows: int = 8, batch_size: int = 8, progress: bool = True,
            on_candidate=None, resume=None, placement: Placement | None = None) -> SensitivityTable:
    """Every estimator for every linear of the decoder blocks x every candidate, from one
    block-by-block pass over the calibration windows of the unquantized model (plus, for
    ``fisher``, one backward pass per window over the first ``gradient_windows`` of them).

    ``on_candidate(name, candidate, dequantized_weight)``, when given, is called for each pair while
    the rest of the model is still unquantized (benchmarks use it to measure the true damage).
    ``resume`` (an :class:`ampq.resume.Resume`) keeps the Fisher weights and each block's estimates,
    so a killed measurement continues after the last finished block. ``placement`` says where the
    work runs (:mod:`ampq.placement`: the device, and under several ranks which linears are this
    rank's; the table is the same on every rank)."""
    if estimator not in ESTIMATORS:
        raise AmpqError(f"unknown sensitivity estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    cands = [Candidate.parse(c) for c in (candidates or DEFAULT_CANDIDATES)]
    tokens = getattr(calibration, "tokens", calibration)
    fisher = None
    if estimator == "fisher":
        fisher = resume.tensors("fisher") if resume is not None else None
        if fisher is None:
            with torch.inference_mode(False):
                fisher = output_fisher(model, tokens[:gradient_windows].clone(),
                                       block_linear_names(model) + expert_projection_names(model), progress=progress,
                                       placement=placement)
            if resume is not None:
                resume.save_tensors("fisher", fisher)
    cal = Calibration(model, tokens, batch_size, placement=placement)
    estimates: dict[str, dict[str, dict[str, float]]] = {e: {} for e in ESTIMATORS if e == "hessian" or fisher}
    nbytes: dict[str, dict[str, int]] = {}
    shapes: dict[str, list[int]] = {}
    done = resume.done if resume is not None and on_candidate is None else 0
    for i, (prefix, block) in enumerate(tqdm(cal.on_device(), total=len(cal.blocks), desc="sensitivity", unit="block", disable=not progress)):
        if i < done:  # measured by a run that was killed
            record = resume.record(i)
            for e, table in record["estimates"].items():
                estimates[e].update(table)
            nbytes.update(record["nbytes"])
            shapes.update(record["shapes"])
            if i == done - 1:
                cal.restore_inputs(resume.inputs())
            continue
        names_before = set(shapes)
        groups = cal.groups(block)
        measure_experts(prefix, block, cal, cands, fisher, estimates, nbytes, shapes)  # before the inputs advance
        all_stats = cal.stats_and_advance(block, groups)
        owners = owned_linears(block, groups, cal.ranks)
        for group in groups:
            stats = all_stats[group[0]]
            weights = {}
            for sub in group:
                if is_router(block, sub):
                    continue  # routers stay in 16 bits
                name = f"{prefix}.{sub}"
                if owners[sub] != cal.ranks.rank:
                    continue
                weights[name] = block.get_submodule(sub).weight.detach().float()
                shapes[name] = list(weights[name].shape)
                nbytes[name] = {}
                for table in estimates.values():
                    table[name] = {}
            for name, cand, deq in _dequantized_candidates(weights, cands, stats):
                rows = row_errors(weights[name], deq, stats.hessian)
                estimates["hessian"][name][cand.name] = float(rows.sum())
                if fisher is not None:
                    estimates["fisher"][name][cand.name] = fisher_damage(rows, fisher[name])
                nbytes[name][cand.name] = cand.nbytes(tuple(shapes[name]))
                if on_candidate is not None:
                    on_candidate(name, cand, deq)
        if cal.ranks.world > 1:
            merge_by_name(cal.ranks, [f"{prefix}.{sub}" for g in groups for sub in g], owners.values(),
                          [*estimates.values(), nbytes, shapes])
        if resume is not None and on_candidate is None:
            mine = [n for n in shapes if n not in names_before]
            resume.save(i, None, cal.inputs, {"estimates": {e: {n: t[n] for n in mine} for e, t in estimates.items()},
                                              "nbytes": {n: nbytes[n] for n in mine},
                                              "shapes": {n: shapes[n] for n in mine}})
    return SensitivityTable(estimator, [c.name for c in cands], estimates[estimator], nbytes, shapes,
                            getattr(model.config, "ampq_source", None),
                            {"windows": int(tokens.shape[0]), "window": int(tokens.shape[1]),
                             **({"gradient_windows": min(gradient_windows, int(tokens.shape[0]))} if fisher else {})},
                            estimates)
