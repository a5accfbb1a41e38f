"""llama.cpp (llama-cpp-python) loaded the way every benchmark here drives it."""

from __future__ import annotations

from pathlib import Path
from unittest import mock


def load_llama(path: Path | str, **kwargs):
    """llama.cpp's model without its extra CPU buffer types (``use_extra_bufts``): those repack the
    weights for AMX, a path that crashes on some virtual machines (this one); the plain path computes
    the same numbers from the file as written (tests/_llama_cpp.py does the same)."""
    import llama_cpp
    import llama_cpp.llama_cpp as low

    default = low.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    with mock.patch.object(low, "llama_model_default_params", params):
        return llama_cpp.Llama(str(path), **kwargs)
