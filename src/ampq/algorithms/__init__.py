"""How codes are chosen for one layer. Every algorithm has the signature of :func:`rtn.rtn`:
``(weight, fmt, stats) -> (codes, params)``; adding one is one file plus one line here."""

from __future__ import annotations

from ampq.algorithms.rtn import rtn
from ampq.errors import AmpqError

ALGORITHMS = {"rtn": rtn}


def get_algorithm(name: str):
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise AmpqError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}") from None
