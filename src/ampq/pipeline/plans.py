"""Plan: one format and algorithm per linear, as human-editable JSON.

A plan comes from the allocator (or a person's editor) and drives quantization; a checkpoint
carries the plan it was made from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ampq import atomic
from ampq.algorithms import get_algorithm
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.pipeline.targets import check_target
from ampq.pipeline.transform import TRANSFORMS

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    format: str
    algorithm: str = "rtn"
    clip: bool = False
    damage: float | None = None  # the estimate the allocator minimised
    bytes: int | None = None


@dataclass
class Plan:
    layers: dict[str, LayerPlan]
    budget: dict = field(default_factory=dict)  # {"bits_per_weight": 4.25} or {"bytes": n}
    source: str | None = None
    estimator: str | None = None
    tie_groups: list[list[str]] = field(default_factory=list)
    # what was done to the float model before sensitivity was measured ({"name": "awq", ...}); a plan
    # is followed on a model transformed the same way (ampq.pipeline.transform)
    transform: dict = field(default_factory=dict)
    target: str = "any"  # the engine whose formats the candidates were (ampq.pipeline.targets)
    # the format of the embedding table (ampq.quant_embedding), whose bytes a size budget counted; None: kept
    embeddings: str | None = None
    head: str | None = None  # the same for an untied output head (quantize's lm_head)

    @property
    def total_bytes(self) -> int | None:
        sizes = [p.bytes for p in self.layers.values()]
        return sum(sizes) if all(s is not None for s in sizes) else None

    def to_dict(self) -> dict:
        return {"ampq_plan": PLAN_VERSION, **asdict(self)}

    def save(self, path: str | Path) -> Path:
        return atomic.write_text(path, json.dumps(self.to_dict(), indent=1))

    @classmethod
    def from_dict(cls, data: dict, where: str = "plan") -> "Plan":
        if not isinstance(data, dict) or data.get("ampq_plan") != PLAN_VERSION:
            raise AmpqError(f"{where} is not an ampq plan (version {PLAN_VERSION}): it needs \"ampq_plan\": {PLAN_VERSION}")
        layers = {}
        for name, entry in (data.get("layers") or {}).items():
            if isinstance(entry, str):  # a hand-written shorthand: "layer": "int4-g128"
                entry = {"format": entry}
            try:
                layer = LayerPlan(**entry)
            except TypeError as e:
                raise AmpqError(f"{where}: layer {name} has an unknown key ({e})") from None
            try:
                get_format(layer.format)
                get_algorithm(layer.algorithm)
            except AmpqError as e:
                raise AmpqError(f"{where}: layer {name}: {e}") from None
            layers[name] = layer
        if not layers:
            raise AmpqError(f"{where} lists no layers")
        transform = data.get("transform") or {}
        if transform.get("name", "none") not in TRANSFORMS:
            raise AmpqError(f"{where}: unknown transform {transform.get('name')!r}; known: {', '.join(TRANSFORMS)}")
        return cls(layers, data.get("budget") or {}, data.get("source"), data.get("estimator"),
                   data.get("tie_groups") or [], transform, check_target(data.get("target") or "any"),
                   _embeddings(data.get("embeddings"), where), _embeddings(data.get("head"), where))

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as e:
            raise AmpqError(f"cannot read plan {path} ({e.strerror})") from None
        except ValueError as e:
            raise AmpqError(f"plan {path} is not valid JSON ({e})") from None
        return cls.from_dict(data, str(path))


def _embeddings(name, where: str) -> str | None:
    if name is None:
        return None
    try:
        get_format(name)
    except AmpqError as e:
        raise AmpqError(f"{where}: embeddings: {e}") from None
    return name
