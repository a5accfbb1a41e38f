"""From a budget to a plan: measure sensitivity (or reuse a saved table), then allocate exactly.

:func:`plan` is ``ampq.plan``: a model, a :class:`~ampq.pipeline.budget.Budget` and calibration text
in, a :class:`~ampq.pipeline.plans.Plan` out (one candidate per linear, bytes within the budget,
estimated damage least). The table is cached per model, candidates and calibration, so another
budget only re-solves the allocation.
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from ampq.algorithms.gptq import DAMP
from ampq.allocate import allocate, reachable
from ampq.builtin import cache_dir
from ampq.data import Text, Windows, as_text, calibration_windows, sized_for
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.models import decoder_blocks, fused_groups, replace_module, tied_embeddings
from ampq.pipeline.budget import Budget, parse_size
from ampq.pipeline.expert_damage import expert_projection_names, expert_weight_bytes
from ampq.placement import Placement
from ampq.quant_embedding import check_row_format
from ampq.pipeline.plans import LayerPlan, Plan
from ampq.pipeline.targets import target_candidates
from ampq.pipeline.transform import TRANSFORMS, ensure_transform
from ampq.report import block_linear_names, model_bytes
from ampq.resume import Resume, fingerprint
from ampq.schemes import Scheme
from ampq.sensitivity import DEFAULT_CANDIDATES, Candidate, SensitivityTable, measure


def tie_groups(layers: list[str]) -> list[list[str]]:
    """q/k/v of one block share a format, and so do gate/up: engines that fuse them need it."""
    return fused_groups(layers)


def table_key(source: str | None, candidates: list[str], calib: dict) -> str:
    # GPTQ's dampening changes every GPTQ candidate's damage: a table measured with another is stale
    blob = json.dumps({"source": source, "candidates": candidates, "calib": calib, "gptq_damp": DAMP}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sensitivity(model: nn.Module, tokenizer, candidates: list[str] | None = None, *, calib: str = "mix",
                windows: int | None = None, window: int = 512, estimator: str = "fisher", table_path=None,
                progress: bool = True, may_measure: bool = True, tokens: Windows | torch.Tensor | None = None,
                transform: str = "none", placement: Placement | None = None) -> SensitivityTable:
    """The sensitivity table of ``model``: read from ``table_path`` or the cache when it was measured
    before with the same candidates and calibration, measured (and saved) otherwise (unless not
    ``may_measure``: a lazily loaded model cannot run whole). The calibration is ``windows`` windows
    of ``window`` tokens of the text ``calib`` (by default :func:`~ampq.data.calibration_windows`),
    or ``tokens`` when given (cached by their hash). ``placement``: where the measurement runs (a device; several ranks share it and the main one
    writes the table)."""
    from ampq.data import make_windows  # looked up at call time: tests replace it

    candidates = [Candidate.parse(c).name for c in (candidates or DEFAULT_CANDIDATES)]
    windows = windows or calibration_windows(model, window)
    # a model built in memory has no source: its weights name it, else it would take another's table
    source = getattr(model.config, "ampq_source", None) or f"weights {fingerprint(model)}"
    if tokens is None:
        spec = {"text": calib, "windows": windows, "window": window, "estimator": estimator}
    else:
        spec = {"tokens": _token_hash(tokens), "estimator": estimator}
    if transform != "none":  # measured on the transformed weights: another table
        spec["transform"] = transform
    if table_path is None:
        table_path = cache_dir() / "sensitivity" / f"{table_key(source, candidates, spec)}.json"
    try:
        table = SensitivityTable.load(table_path)
        if table.candidates == candidates and table.estimator == estimator and \
                table.calibration.get("transform", "none") == transform:
            return table
    except AmpqError:
        pass
    if not may_measure:
        raise AmpqError("--max-memory cannot measure sensitivity (it runs the whole model); measure it once without "
                        "the cap (`ampq plan MODEL --budget ...` caches the table), then quantize with --max-memory, "
                        "or pass --plan")
    if tokens is None:
        tokens = make_windows(tokenizer, calib, "calib", window, windows)
    table_path = Path(table_path)
    # a measurement killed half-way continues where it was (the hidden folder beside the table)
    resume = Resume(table_path.with_name(f".{table_path.name}.ampq-resume"),
                    {"table": table_key(source, candidates, spec), "weights": fingerprint(model),
                     "tokens": _token_hash(tokens)}, placement.ranks if placement is not None else None)
    if resume.done and progress:
        print(f"resuming the sensitivity measurement: {resume.done} blocks were measured by an earlier run",
              file=sys.stderr)
    table = measure(model, tokens, candidates, estimator=estimator, progress=progress, resume=resume,
                    placement=placement)
    table.calibration = {**table.calibration, **spec}
    if placement is None or placement.ranks.main:
        table_path.parent.mkdir(parents=True, exist_ok=True)
        table.save(table_path)
    resume.finish()
    return table


def _token_hash(tokens: Windows | torch.Tensor) -> str:
    return hashlib.sha256(getattr(tokens, "tokens", tokens).numpy().tobytes()).hexdigest()


def plan(model: nn.Module, budget: Budget | float, *, calibration: Text | str | Windows | torch.Tensor = "mix",
         tokenizer=None, progress: bool = True) -> Plan:
    """The plan of least estimated damage for ``model`` within ``budget`` (a :class:`Budget`, or bits
    per weight): the sensitivity table is read from the cache or measured on ``calibration`` (a text
    name, a :class:`~ampq.data.Text`, or token windows; a text needs the model's ``tokenizer``)."""
    return plan_with_table(model, budget, calibration, tokenizer, progress=progress)[0]


def plan_with_table(model: nn.Module, budget: Budget | float, calibration, tokenizer, *, progress: bool = True,
                    may_measure: bool = True, placement: Placement | None = None) -> tuple[Plan, SensitivityTable]:
    """:func:`plan`, and the sensitivity table it was allocated from (measured on ``placement``)."""
    budget = budget if isinstance(budget, Budget) else Budget(bits=float(budget))
    if budget.transform == "auto":
        return _plan_best_transform(model, budget, calibration, tokenizer, progress=progress, may_measure=may_measure)
    t0 = time.perf_counter()
    calibration = sized_for(calibration, model) if calibration is not None else None
    candidates = target_candidates(budget.target, budget.candidates)
    transform = {"name": "none"}
    if budget.transform != "none":
        if calibration is None:
            raise AmpqError(f"transform {budget.transform!r} needs calibration text: pass calibration='mix' and the "
                            "model's tokenizer (CLI: --calib mix)")
        if isinstance(calibration, (str, Text)):
            calibration = as_text(calibration).cut(tokenizer, "calib")
        transform = ensure_transform(model, budget.transform, calibration, progress=progress)
    if isinstance(calibration, (str, Text)):
        text = as_text(calibration)
        table = sensitivity(model, tokenizer, candidates, calib=text.source, windows=text.windows,
                            window=text.window, estimator=budget.estimator, table_path=budget.sensitivity,
                            progress=progress, may_measure=may_measure, placement=placement)
    elif calibration is not None:
        table = sensitivity(model, tokenizer, candidates, estimator=budget.estimator, progress=progress,
                            table_path=budget.sensitivity, may_measure=may_measure, tokens=calibration,
                            transform=budget.transform, placement=placement)
    else:
        raise AmpqError("a budget needs calibration text to measure sensitivity: pass calibration='wiki' and the "
                        "model's tokenizer (CLI: --calib wiki)")
    t1 = time.perf_counter()
    fixed = fixed_bytes(model, block_linear_names(model) + expert_projection_names(model))
    result = plan_for_budget(table, bits_per_weight=budget.bits, max_size=budget.bytes,
                             fixed=fixed - embedding_bytes_saved(model, budget.embeddings)
                             - head_bytes_saved(model, budget.head), tied=budget.tied)
    result.transform = transform
    result.target = budget.target
    result.embeddings, result.head = budget.embeddings, budget.head
    if progress:
        print(f"stage times: sensitivity {t1 - t0:.1f} s (0 when reused from the cache), allocation "
              f"{1e3 * (time.perf_counter() - t1):.0f} ms", file=sys.stderr)
        print(f"plan: {bits_of(result, table):.3f} bits per weight, {result.total_bytes / 1e6:.1f} MB of linears; "
              + ", ".join(f"{k} x{v}" for k, v in describe(result).items()), file=sys.stderr)
    return result, table


def _plan_best_transform(model: nn.Module, budget: Budget, calibration, tokenizer, *, progress: bool,
                         may_measure: bool) -> tuple[Plan, SensitivityTable]:
    """``transform="auto"``: a plan for the model as it is and one for each transform (measured on a
    transformed copy), the one of least estimated damage kept. The damages are comparable: each is
    the KL to the same float function (a transform does not change what the float model computes),
    and the choice is per model, since what a transform is worth depends on the model's weights
    (benchmarks/quality.py). When a transform wins, the model takes the copy's decoder blocks (every
    transform acts within the blocks)."""
    if getattr(model.config, "ampq_transform", None) is not None:
        raise AmpqError("transform auto compares the model with and without a transform, but this model was already "
                        "transformed; start from the unquantized model or name the transform")
    if isinstance(calibration, (str, Text)):
        if tokenizer is None:
            raise AmpqError("transform auto needs the model's tokenizer to read the calibration text")
        calibration = as_text(calibration).cut(tokenizer, "calib")
    tried = {}
    for name in TRANSFORMS:
        candidate_model = model if name == "none" else copy.deepcopy(model)
        result, table = plan_with_table(candidate_model, replace(budget, transform=name), calibration, tokenizer,
                                        progress=progress, may_measure=may_measure)
        tried[name] = (sum(p.damage for p in result.layers.values()), result, table, candidate_model)
    best = min(tried, key=lambda n: tried[n][0])
    damage, result, table, chosen = tried[best]
    if chosen is not model:
        blocks = decoder_blocks(model)[0][0].rpartition(".")[0]
        replace_module(model, blocks, chosen.get_submodule(blocks))
        model.config.ampq_transform = chosen.config.ampq_transform
    result.transform = {**result.transform, "compared": {n: t[0] for n, t in tried.items()}}
    if progress:
        print("transform auto: estimated damage " + ", ".join(f"{n} {t[0]:.4f}" for n, t in tried.items())
              + f"; kept {best}", file=sys.stderr)
    return result, table


def matching_uniform(table: SensitivityTable, budget: Budget, fixed: int = 0) -> Scheme:
    """The candidate that, given to every linear, comes nearest the budget's size (16-bit ones
    excepted), as a scheme: the uniform one to compare a budget's plan with. ``fixed``: the bytes
    outside the linears, for a budget in bytes."""
    weights = sum(s[0] * s[1] for s in table.shapes.values())
    target = budget.bits * weights / 8 if budget.bits is not None else budget.bytes - fixed
    sizes = {}
    for name in table.candidates:
        if Candidate.parse(name).format in ("bf16", "fp16") or not all(name in table.nbytes[n] for n in table.nbytes):
            continue
        sizes[name] = sum(table.nbytes[n][name] for n in table.nbytes)
    if not sizes:
        raise AmpqError("no candidate of this table fits every layer; add one like int4-g128:gptq to the candidates")
    cand = Candidate.parse(min(sizes, key=lambda n: (abs(sizes[n] - target), sizes[n])))
    return Scheme(cand.algorithm + ("+clip" if cand.clip else ""), cand.format,
                  f"{cand.name} in every linear, the uniform size nearest the budget", cand.algorithm, cand.clip)


def fixed_bytes(model: nn.Module, layers: list[str]) -> int:
    """Bytes of everything the allocation does not choose (all but the listed linears' weights)."""
    experts = set(expert_projection_names(model))
    chosen = sum(expert_weight_bytes(model, n) if n in experts else
                 model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in layers)
    return model_bytes(model) - chosen


def embedding_bytes_saved(model: nn.Module, format_name: str | None) -> int:
    """Bytes that storing ``model``'s embedding table in ``format_name`` takes off the model (0 for None)."""
    if format_name is None:
        return 0
    table = model.get_input_embeddings().weight
    shape = tuple(table.shape)
    check_row_format(format_name, shape)
    return table.numel() * table.element_size() - get_format(format_name).nbytes(shape)


def head_bytes_saved(model: nn.Module, format_name: str | None) -> int:
    """Bytes that storing ``model``'s untied output head in ``format_name`` takes off the model (0
    for None; a tied head is the embedding table, which ``embeddings`` stores)."""
    if format_name is None or tied_embeddings(model):
        return 0
    weight = model.get_output_embeddings().weight
    return weight.numel() * weight.element_size() - get_format(format_name).nbytes(tuple(weight.shape))


def plan_for_budget(table: SensitivityTable, *, bits_per_weight: float | None = None,
                    max_size: int | str | None = None, fixed: int = 0, tied: bool = True) -> Plan:
    """The allocation of least estimated damage whose bytes fit the budget, as a plan."""
    if (bits_per_weight is None) == (max_size is None):
        raise AmpqError("give exactly one budget: bits per weight (Budget(bits=4.25), CLI --budget 4.25) or a size "
                        "(Budget(bytes='90MB'), CLI --max-size 90MB)")
    weights = sum(s[0] * s[1] for s in table.shapes.values())
    if bits_per_weight is not None:
        budget = int(bits_per_weight * weights // 8)
        described = {"bits_per_weight": bits_per_weight}
    else:
        total = parse_size(max_size)
        budget = total - fixed
        described = {"bytes": total}
        if budget <= 0:
            raise AmpqError(f"a size of {total:,} bytes is below the {fixed:,} bytes the model needs outside its "
                            "quantizable linears (embeddings, norms, head)")
    groups = tie_groups(list(table.damage)) if tied else []
    try:
        result = allocate(table.damage, table.nbytes, budget, groups)
    except AmpqError:
        if max_size is not None:
            lo, hi = reachable(table.nbytes, groups)
            raise AmpqError(f"a size of {parse_size(max_size):,} bytes cannot be met: this model spans "
                            f"{(lo + fixed) / 1e6:.1f} MB to {(hi + fixed) / 1e6:.1f} MB with these candidates") from None
        lo, hi = reachable(table.nbytes, groups)
        raise AmpqError(f"a budget of {bits_per_weight} bits per weight cannot be met: these candidates span "
                        f"{8 * lo / weights:.3f} to {8 * hi / weights:.3f} bits per weight") from None
    layers = {}
    for name, cand_name in result.choice.items():
        cand = Candidate.parse(cand_name)
        layers[name] = LayerPlan(cand.format, cand.algorithm, cand.clip, table.damage[name][cand_name],
                                 table.nbytes[name][cand_name])
    return Plan(layers, described, table.source, table.estimator, groups)


def bits_of(plan: Plan, table: SensitivityTable) -> float:
    weights = sum(table.shapes[n][0] * table.shapes[n][1] for n in plan.layers)
    return 8 * plan.total_bytes / weights


def describe(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plan.layers.values():
        key = p.format if p.algorithm == "rtn" else f"{p.format}:{p.algorithm}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
