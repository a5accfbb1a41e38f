"""Number formats by name.

Names are data users type: ``int4-g128``, ``int4-g128-sym``, ``int4-g128-zp`` (integer zero points), ``int8-ch``, ``nf4-b64-dq``,
``fp8-e4m3-ch``, ``e2m1-g32``, ``nvfp4``/``mxfp4`` (microscaled FP4, as compressed-tensors writes it),
llama.cpp's block types by their GGUF names (``q4_k``, ``q6_k``, ``iq4_xs``, ...),
and ``bf16``/``fp16`` (unquantized). Granularity suffixes: ``-gN`` (or ``-bN``) a group of N inputs,
``-ch`` one group per output channel, ``-t`` (or nothing, for minifloats) one for the whole tensor.
Adding a family is one file in this package plus one entry in ``_FAMILIES``.
"""

from __future__ import annotations

import difflib
import re
from functools import lru_cache

from ampq.errors import AmpqError
from ampq.formats.base import Format, Params
from ampq.formats.integer import IntegerFormat
from ampq.formats.iq4 import IQ4Format
from ampq.formats.kquants import KQuantFormat
from ampq.formats.microscaled import MicroscaledFP4Format
from ampq.formats.minifloat import MinifloatFormat
from ampq.formats.normal_float import NormalFloatFormat
from ampq.formats.plain import PlainFloatFormat

__all__ = ["Format", "Params", "get_format", "known_formats", "STANDARD_FORMATS", "GGUF_TYPES"]

# The usual settings of each family: what `ampq formats` lists and the uniform benchmark runs.
STANDARD_FORMATS = [
    "int8-ch", "int8-ch-sym", "int6-g128", "int5-g128",
    "int4-g128", "int4-g128-sym", "int4-g64", "int4-g32",
    "int3-g128", "int3-g64", "int2-g64", "int2-g32",
    "nf4-b64", "nf4-b64-dq", "fp4-b64", "fp4-b64-dq",
    "fp8-e4m3-ch", "fp8-e5m2-ch", "fp8-e4m3",
    "e3m2-g32", "e2m3-g32", "e2m1-g32", "nvfp4", "mxfp4",
]

_GRAN = r"(?:-(?P<gran>ch|t|[gb]\d+))?"
_FAMILIES = [
    (re.compile(r"int(?P<bits>\d)" + _GRAN + r"(?:(?P<sym>-sym)|(?P<zp>-zp))?"), "integer"),
    (re.compile(r"(?P<kind>nf4|fp4)(?:-b(?P<block>\d+))?(?P<dq>-dq)?"), "normal_float"),
    (re.compile(r"(?:fp(?P<total>\d)-)?e(?P<e>\d)m(?P<m>\d)" + _GRAN), "minifloat"),
]


def _group(gran: str | None, default: int | None) -> int | None:
    if gran is None:
        return default
    if gran == "ch":
        return None
    if gran == "t":
        return 0
    size = int(gran[1:])
    if size < 1:
        raise AmpqError(f"group size must be positive in {gran!r}")
    return size


# llama.cpp's block types, each bit for bit as llama.cpp decodes it
GGUF_TYPES = [*KQuantFormat.TYPES, "iq4_nl", "iq4_xs"]


def _build(name: str) -> Format | None:
    if name in ("bf16", "fp16"):
        return PlainFloatFormat(name)
    if name in ("nvfp4", "mxfp4"):
        return MicroscaledFP4Format(name)
    if name in KQuantFormat.TYPES:
        return KQuantFormat(name)
    if name in ("iq4_nl", "iq4_xs"):
        return IQ4Format(name)
    for pattern, family in _FAMILIES:
        m = pattern.fullmatch(name)
        if not m:
            continue
        d = m.groupdict()
        if family == "integer":
            bits = int(d["bits"])
            if not 2 <= bits <= 8:
                raise AmpqError(f"integer formats have 2 to 8 bits, not {bits} ({name!r})")
            if d["gran"] is None:
                raise AmpqError(f"{name!r} needs a granularity: {name}-g128 (group of 128 inputs) or {name}-ch (per channel)")
            return IntegerFormat(bits, _group(d["gran"], None), bool(d["sym"]), name, zero_point=bool(d["zp"]))
        if family == "normal_float":
            block = int(d["block"] or 64)
            return NormalFloatFormat(d["kind"], block, bool(d["dq"]), name)
        e, mant = int(d["e"]), int(d["m"])
        if d["total"] is not None and int(d["total"]) != 1 + e + mant:
            raise AmpqError(f"{name!r}: fp{d['total']} does not have 1 sign + {e} exponent + {mant} mantissa bits")
        if e < 1 or 1 + e + mant > 8:
            raise AmpqError(f"minifloats need 1 to 7 exponent bits and at most 8 bits in all ({name!r})")
        return MinifloatFormat(e, mant, _group(d["gran"], 0), name)
    return None


@lru_cache(maxsize=None)
def get_format(name: str) -> Format:
    """The format called ``name``; an unknown name raises an error listing close matches."""
    fmt = _build(name.strip().lower())
    if fmt is None:
        close = difflib.get_close_matches(name.lower(), known_formats(), n=4, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise AmpqError(f"unknown format {name!r}.{hint} `ampq formats` lists them all.")
    return fmt


def known_formats() -> list[str]:
    return list(STANDARD_FORMATS) + ["bf16", "fp16", "int4-ch", "int8-g128", "int4-g128-zp", "int3-ch", "nf4-b128", "fp8-e4m3-g128",
                                     "fp8-e5m2", "e2m1-b32", "e3m2-ch", "e2m3-ch", *GGUF_TYPES]
