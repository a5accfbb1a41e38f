"""ampq: adaptive mixed-precision post-training quantization for transformer language models.

    import ampq
    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, "int4-g128")
    ampq.save(model, "out/smollm2-int4", tok)
    model = ampq.load("out/smollm2-int4")
    ampq.adapt(model, budget=5.0)   # adaptive checkpoints (ampq quantize --adaptive 4:8) switch precision
"""

from __future__ import annotations

from ampq.adapt import adapt
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.io.model import save
from ampq.loading import load, load_model
from ampq.nn import QuantLinear
from ampq.plan import Plan
from ampq.quantize import quantize
from ampq.version import __version__

try:  # registers quant_method "ampq" so transformers' from_pretrained loads ampq checkpoints
    from ampq import hf as _hf  # noqa: F401
except Exception:  # noqa: BLE001 - a transformers without the quantizer API: ampq works without it
    _hf = None

__all__ = ["AmpqError", "Plan", "QuantLinear", "adapt", "get_format", "load", "load_model", "quantize", "save",
           "__version__"]
