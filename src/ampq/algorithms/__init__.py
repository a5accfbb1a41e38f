"""How codes are chosen for one layer.

Every algorithm has one signature: ``(weight, fmt, stats, clip) -> (codes, params)`` where ``weight``
is the float32 (out, in) matrix, ``fmt`` the target format, ``stats`` the layer's calibration
statistics (:class:`ampq.calibrate.LayerStats`, None when the algorithm needs none) and ``clip`` the
per-group clipping ratios chosen by :mod:`clip` (1.0 for none). Adding one is one file plus one line
in ``ALGORITHMS``. Steps that act on a whole block (AWQ's scaling) or after the codes are chosen
(bias correction) live beside them and are composed by the pipeline.
"""

from __future__ import annotations

from ampq.algorithms.gptq import gptq
from ampq.algorithms.rtn import rtn
from ampq.errors import AmpqError

ALGORITHMS = {"rtn": rtn, "gptq": gptq}
NEEDS_CALIBRATION = {"gptq"}


def get_algorithm(name: str):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise AmpqError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None
