"""Schemes: the techniques users know by name, each a preset over a format, an algorithm and the
extra steps (clip search, bias correction, AWQ scaling, activation handling). Any scheme takes
another format where it fits (`--scheme gptq --format int3-g128`)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from ampq.algorithms import NEEDS_CALIBRATION, get_algorithm
from ampq.errors import AmpqError
from ampq.formats import get_format


@dataclass(frozen=True)
class Scheme:
    name: str
    format: str
    description: str
    algorithm: str = "rtn"
    clip: bool = False
    bias_correction: bool = False
    awq: bool = False
    activation: str | None = None
    options: dict = field(default_factory=dict)

    def __post_init__(self):
        get_format(self.format)  # a scheme in a format that does not exist is refused when it is made
        get_algorithm(self.algorithm)

    @property
    def needs_calibration(self) -> bool:
        return self.algorithm in NEEDS_CALIBRATION or self.clip or self.bias_correction or self.awq

    def quantize_kwargs(self) -> dict:
        return {"algorithm": self.algorithm, "clip": self.clip, "bias_correction": self.bias_correction,
                "awq": self.awq, "activation": self.activation, "options": dict(self.options)}


SCHEMES = {s.name: s for s in [
    Scheme("rtn", "int4-g128", "round to nearest, no calibration"),
    Scheme("gptq", "int4-g128", "GPTQ: Hessian error feedback, 10% dampening, blocks of 128 columns, "
           "act-order with static groups", "gptq"),
    Scheme("gptq-in-order", "int4-g128", "GPTQ visiting columns in order, each group fitted when reached",
           "gptq", options={"act_order": False}),
    Scheme("gptq-ecb", "int4-g128", "GPTQ after clip search, then bias correction", "gptq", True, True),
    Scheme("rtn-ecb", "int4-g128", "round to nearest after clip search, then bias correction", "rtn", True, True),
    Scheme("awq", "int4-g128", "AWQ: activation-aware input-channel scales, then clip search", "rtn", True, awq=True),
    Scheme("eetq", "int8-ch-sym", "EETQ: int8 per-channel symmetric, weight only"),
    Scheme("llm-int8", "int8-ch-sym", "bitsandbytes LLM.int8: int8 vector-wise, inputs above 6.0 in 16 bit",
           activation="int8-outlier:6.0"),
    Scheme("bnb-nf4", "nf4-b64", "bitsandbytes NF4, blocks of 64"),
    Scheme("bnb-nf4-dq", "nf4-b64-dq", "bitsandbytes NF4 with double quantization"),
    Scheme("bnb-fp4", "fp4-b64", "bitsandbytes FP4, blocks of 64"),
    Scheme("bnb-fp4-dq", "fp4-b64-dq", "bitsandbytes FP4 with double quantization"),
    Scheme("fp8", "fp8-e4m3-ch", "FP8 E4M3 weight only, per-channel scale"),
    Scheme("fp8-e5m2", "fp8-e5m2-ch", "FP8 E5M2 weight only, per-channel scale"),
    Scheme("fp8-w8a8", "fp8-e4m3-ch", "FP8 E4M3 weights and activations, dynamic per-token activation scale",
           activation="fp8-e4m3-token"),
]}

# the spellings of Text Generation Inference's --quantize, and other common ones
ALIASES = {"bitsandbytes": "llm-int8", "bitsandbytes-nf4": "bnb-nf4", "bitsandbytes-fp4": "bnb-fp4",
           "llm_int8": "llm-int8", "bnb-int8": "llm-int8", "int8": "llm-int8", "nf4": "bnb-nf4"}


def get_scheme(name: str) -> Scheme:
    key = name.strip().lower()
    key = ALIASES.get(key, key)
    if key in SCHEMES:
        return SCHEMES[key]
    close = difflib.get_close_matches(key, list(SCHEMES) + list(ALIASES), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise AmpqError(f"unknown scheme {name!r}.{hint} Known: {', '.join(SCHEMES)}.")
