"""The pipeline: from a model and a spec (a format, a scheme, a plan, a budget) to a quantized model.

- ``budget.py``: :class:`Budget`, what a plan may store.
- ``planner.py``: sensitivity table (cached) -> exact allocation -> :class:`Plan` (``ampq.plan``).
- ``plans.py``: :class:`Plan`, one format and algorithm per linear, as editable JSON.
- ``blockwise.py``: the block-by-block loop that replaces linears by QuantLinear.
- ``adaptive.py``: nested storage at several precisions, switched at run time (``ampq.adapt``).
- ``run.py``: one run, what ``ampq.quantize`` does: resolve the spec, calibrate, quantize, resume, save.

The public names are exported by ``ampq`` itself; this package exports none, so that no function
here shares a name with a module.
"""
