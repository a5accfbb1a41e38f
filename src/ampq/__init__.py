"""ampq: adaptive mixed-precision post-training quantization for transformer language models.

    import ampq
    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, ampq.Budget(bits=4.25), calibration="mix", tokenizer=tok, output="smol-4.25")
    model = ampq.load("smol-4.25")
    ampq.evaluate(model, ampq.load_model("smollm2-135m")[0], text="wiki", tokenizer=tok)

``ampq.quantize`` also takes a format name ("int4-g128"), a per-module map, a scheme
(``ampq.get_scheme("gptq")``) or a plan (``ampq.plan(model, ampq.Budget(bits=4.25), ...)``);
``ampq.adapt(model, budget=5.0)`` switches the precision of an adaptive checkpoint
(``ampq.quantize(..., adaptive="4:8")``); ``ampq.export`` writes a checkpoint for vLLM or llama.cpp;
``ampq.compile(model).generate(ids, 40)`` decodes with a static KV cache and a compiled step.
"""

from __future__ import annotations

from ampq.coverage import coverage
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.io.model import save
from ampq.loading import load, load_model
from ampq.nn import QuantLinear
from ampq.data import Text
from ampq.schemes import Scheme, get_scheme
from ampq.pipeline.adaptive import adapt
from ampq.pipeline.budget import Budget
from ampq.pipeline.planner import plan
from ampq.pipeline.plans import Plan
from ampq.pipeline.run import quantize
from ampq.comparison import evaluate
from ampq.compiled import compile
from ampq.exporting import export
from ampq.version import __version__

try:  # registers quant_method "ampq" so transformers' from_pretrained loads ampq checkpoints
    from ampq import hf as _hf  # noqa: F401
except Exception:  # noqa: BLE001 - a transformers without the quantizer API: ampq works without it
    _hf = None

__all__ = ["AmpqError", "Budget", "Plan", "QuantLinear", "Scheme", "Text", "adapt", "compile", "coverage", "evaluate", "export",
           "get_format", "get_scheme", "load", "load_model", "plan", "quantize", "save", "__version__"]
