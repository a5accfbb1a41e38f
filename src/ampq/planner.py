"""From a budget to a plan: measure sensitivity (or reuse a saved table), then allocate exactly.

A budget is either bits per weight over the quantized linears (``4.25``) or the size of the whole
model on disk (``90MB``): the bytes that are not linears of the decoder blocks (embeddings, norms,
the head) are subtracted first, since the allocation cannot change them.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import torch
from torch import nn

from ampq.allocate import allocate, reachable
from ampq.builtin import cache_dir
from ampq.data import make_windows
from ampq.errors import AmpqError
from ampq.plan import LayerPlan, Plan
from ampq.report import model_bytes
from ampq.resume import Resume, fingerprint
from ampq.sensitivity import DEFAULT_CANDIDATES, Candidate, SensitivityTable, measure

_SIZE = re.compile(r"^\s*([0-9.]+)\s*(b|kb|mb|gb|kib|mib|gib)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise AmpqError(f"cannot read size {text!r}; write it like 90MB, 1.5GB or 123456789")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def tie_groups(layers: list[str]) -> list[list[str]]:
    """q/k/v of one block share a format, and so do gate/up: engines that fuse them need it."""
    groups: dict[tuple[str, str], list[str]] = {}
    for name in layers:
        prefix, _, leaf = name.rpartition(".")
        kind = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}.get(leaf)
        if kind:
            groups.setdefault((prefix.rpartition(".")[0], kind), []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def table_key(source: str | None, candidates: list[str], calib: dict) -> str:
    blob = json.dumps({"source": source, "candidates": candidates, "calib": calib}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sensitivity(model: nn.Module, tokenizer, candidates: list[str] | None = None, *, calib: str = "wiki",
                windows: int = 128, window: int = 512, estimator: str = "fisher", table_path=None,
                progress: bool = True, may_measure: bool = True) -> SensitivityTable:
    """The sensitivity table of ``model``: read from ``table_path`` or the cache when it was measured
    before with the same candidates and calibration, measured (and saved) otherwise (unless not
    ``may_measure``: a lazily loaded model cannot run whole)."""
    candidates = [Candidate.parse(c).name for c in (candidates or DEFAULT_CANDIDATES)]
    source = getattr(model.config, "ampq_source", None)
    spec = {"text": calib, "windows": windows, "window": window, "estimator": estimator}
    if table_path is None:
        table_path = cache_dir() / "sensitivity" / f"{table_key(source, candidates, spec)}.json"
    try:
        table = SensitivityTable.load(table_path)
        if table.candidates == candidates and table.estimator == estimator:
            return table
    except AmpqError:
        pass
    if not may_measure:
        raise AmpqError("--max-memory cannot measure sensitivity (it runs the whole model); measure it once without "
                        "the cap (`ampq plan MODEL --budget ...` caches the table), then quantize with --max-memory, "
                        "or pass --plan")

    tokens = make_windows(tokenizer, calib, "calib", window, windows)
    table_path = Path(table_path)
    # a measurement killed half-way continues where it was (the hidden folder beside the table)
    resume = Resume(table_path.with_name(f".{table_path.name}.ampq-resume"),
                    {"table": table_key(source, candidates, spec), "weights": fingerprint(model),
                     "tokens": hashlib.sha256(getattr(tokens, "tokens", tokens).numpy().tobytes()).hexdigest()})
    if resume.done and progress:
        print(f"resuming the sensitivity measurement: {resume.done} blocks were measured by an earlier run",
              file=sys.stderr)
    table = measure(model, tokens, candidates, estimator=estimator, progress=progress, resume=resume)
    table.calibration = {**table.calibration, **spec}
    table_path.parent.mkdir(parents=True, exist_ok=True)
    table.save(table_path)
    resume.finish()
    return table


def fixed_bytes(model: nn.Module, layers: list[str]) -> int:
    """Bytes of everything the allocation does not choose (all but the listed linears' weights)."""
    chosen = sum(model.get_submodule(n).weight.numel() * model.get_submodule(n).weight.element_size() for n in layers)
    return model_bytes(model) - chosen


def plan_for_budget(table: SensitivityTable, *, bits_per_weight: float | None = None,
                    max_size: int | str | None = None, fixed: int = 0, tied: bool = True) -> Plan:
    """The allocation of least estimated damage whose bytes fit the budget, as a plan."""
    if (bits_per_weight is None) == (max_size is None):
        raise AmpqError("give exactly one budget: bits per weight (--budget 4.25) or a size (--max-size 90MB)")
    weights = sum(s[0] * s[1] for s in table.shapes.values())
    if bits_per_weight is not None:
        budget = int(bits_per_weight * weights // 8)
        described = {"bits_per_weight": bits_per_weight}
    else:
        total = parse_size(max_size)
        budget = total - fixed
        described = {"bytes": total}
        if budget <= 0:
            raise AmpqError(f"--max-size {total:,} bytes is below the {fixed:,} bytes the model needs outside its "
                            "quantizable linears (embeddings, norms, head)")
    groups = tie_groups(list(table.damage)) if tied else []
    try:
        result = allocate(table.damage, table.nbytes, budget, groups)
    except AmpqError:
        if max_size is not None:
            lo, hi = reachable(table.nbytes, groups)
            raise AmpqError(f"--max-size {parse_size(max_size):,} bytes cannot be met: this model spans "
                            f"{(lo + fixed) / 1e6:.1f} MB to {(hi + fixed) / 1e6:.1f} MB with these candidates") from None
        lo, hi = reachable(table.nbytes, groups)
        raise AmpqError(f"--budget {bits_per_weight} bits per weight cannot be met: these candidates span "
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


@torch.inference_mode()
def describe(plan: Plan) -> dict[str, int]:
    counts: dict[str, int] = {}
    for p in plan.layers.values():
        key = p.format if p.algorithm == "rtn" else f"{p.format}:{p.algorithm}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
