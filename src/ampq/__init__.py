"""ampq: adaptive mixed-precision post-training quantization for transformer language models.

    import ampq
    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, "int4-g128")
    ampq.save(model, "out/smollm2-int4", tok)
    model = ampq.load("out/smollm2-int4")
"""

from __future__ import annotations

__version__ = "0.1.0"

from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.io.model import load, save
from ampq.models import load_model
from ampq.nn import QuantLinear
from ampq.quantize import quantize

__all__ = ["AmpqError", "QuantLinear", "get_format", "load", "load_model", "quantize", "save", "__version__"]
