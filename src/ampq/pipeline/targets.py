"""Serving targets: the engine a plan is made for decides its candidates, so that every layer of the
plan is a format that engine runs as stored and the export changes nothing.

The formats each engine holds exactly are the rows marked exact in the README's engine matrix (and
checked layer by layer by the exporters): vLLM's compressed-tensors runs int4 weight-only with
symmetric groups or integer zero points, int8 symmetric per channel, FP8 E4M3 per channel, NVFP4 and
MXFP4 weight-only (compressed-tensors' NVFP4A16 / MXFP4A16, run by vLLM's FP4 Marlin kernel on GPUs of
compute capability 7.5 / 8.0 and up: docs/export.md says where this was checked) and 16-bit layers;
llama.cpp's GGUF runs Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 (ampq's int4/int5 in groups of 32,
symmetric or min-and-scale, and int8-g32-sym), its own K-quants and IQ4 types (ampq's ``q2_k`` ..
``q6_k``, ``iq4_nl``, ``iq4_xs``: a layer whose inputs are not whole blocks of 256, or 32 for
IQ4_NL, simply lacks them as choices, as llama.cpp's own quantizer falls back there) and 16-bit
tensors. Integer, FP4 and block formats take GPTQ (the block formats' parameters searched against the
calibration's importance first), the 8-bit ones round to nearest (GPTQ gains nothing measurable there).
"""

from __future__ import annotations

from ampq.errors import AmpqError
from ampq.sensitivity import DEFAULT_CANDIDATES

# target -> (the export that serves it, the candidates of a plan made for it)
TARGETS: dict[str, tuple[str | None, list[str]]] = {
    "vllm": ("compressed-tensors", ["int4-g128-sym:gptq", "int4-g64-sym:gptq", "int4-g32-sym:gptq",
                                    "int4-g128-zp:gptq", "int4-g64-zp:gptq", "mxfp4:gptq", "nvfp4:gptq", "fp8-e4m3-ch:rtn",
                                    "int8-ch-sym:rtn", "bf16"]),
    "llama.cpp": ("gguf", ["q2_k:gptq", "q3_k:gptq", "iq4_xs:gptq", "q4_k:gptq", "iq4_nl:gptq", "q5_k:gptq",
                           "q6_k:gptq", "int4-g32-sym:gptq", "int4-g32:gptq", "int5-g32-sym:gptq", "int5-g32:gptq",
                           "int8-g32-sym:rtn", "bf16"]),
    "transformers": (None, DEFAULT_CANDIDATES),  # ampq's own layers: every format runs
    "any": (None, DEFAULT_CANDIDATES),
}


def check_target(name: str) -> str:
    if name not in TARGETS:
        raise AmpqError(f"unknown serving target {name!r}; choose one of {', '.join(TARGETS)}")
    return name


def target_candidates(name: str, candidates=None) -> list[str]:
    """The candidates of a plan for ``name``: the target's own, or the ones given, which must be
    formats the target serves (else the plan would not export as chosen)."""
    allowed = TARGETS[check_target(name)][1]
    if not candidates:
        return list(allowed)
    if TARGETS[name][0] is not None:
        outside = [c for c in candidates if c not in allowed]
        if outside:
            raise AmpqError(f"{', '.join(outside)} cannot be served by {name} as stored; give candidates among "
                            f"{', '.join(allowed)}, or drop --target")
    return list(candidates)


def check_export(plan_target: str | None, export: str) -> None:
    """Refuse to export a plan made for another engine: its layers were chosen among formats that
    engine runs, and ``--nearest`` would re-quantize what the allocation chose."""
    serves = TARGETS.get(plan_target or "any", (None, []))[0]
    if serves is not None and serves != export:
        other = next(t for t, (e, _) in TARGETS.items() if e == export)
        raise AmpqError(f"this checkpoint's plan was made for {plan_target} (export --to {serves}); to serve it with "
                        f"{other}, plan again with --target {other}")
