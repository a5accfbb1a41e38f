"""One quantization run, what ``ampq.quantize`` does: resolve what to do (a format name, a
per-module map, a :class:`~ampq.schemes.Scheme`, a :class:`~ampq.pipeline.plans.Plan` or a
:class:`~ampq.pipeline.budget.Budget`), calibrate where the method needs it, quantize block by block
(resuming a killed run that wrote the same output), and save the checkpoint with what made it.

    model, tok = ampq.load_model("smollm2-135m")
    ampq.quantize(model, ampq.Budget(bits=4.25), calibration="mix", tokenizer=tok, output="smol-4.25")
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ampq.version import __version__
from ampq.algorithms import NEEDS_CALIBRATION
from ampq.calibrate import autocast_dtype
from ampq.coverage import coverage
from ampq.data import Text, Windows, sized_for, windows_of
from ampq.errors import AmpqError
from ampq.experts import experts_modules
from ampq.formats import get_format
from ampq.io.lazy import weights_of
from ampq.io.model import save
from ampq.memory import MemoryCap
from ampq.models import decoder_blocks, kept_towers, lm_head_name, tied_embeddings
from ampq.nested import parse_levels
from ampq.nn import quantized_linears
from ampq.quant_experts import quantized_projections
from ampq.pipeline.adaptive import level_table, nested_layers, quantize_adaptive, stored_range
from ampq.pipeline.blockwise import format_for, quantize_blocks
from ampq.pipeline.budget import Budget, parse_size
from ampq.pipeline.planner import embedding_bytes_saved, plan_with_table
from ampq.quant_embedding import quantize_embeddings
from ampq.pipeline.transform import ensure_transform
from ampq.pipeline.plans import Plan
from ampq.placement import placement_for
from ampq.ranks import Ranks
from ampq.report import linear_bits, model_bytes
from ampq.resume import Resume, fingerprint, progress_dir
from ampq.schemes import SCHEMES, Scheme

Spec = str | Mapping[str, str | None] | Scheme | Plan | Budget
CALIBRATION = {"window": 512}  # a text's window when only its name is given (its count: data.calibration_windows)


def label(spec: Spec | None, adaptive: str | list[int] | None = None) -> str:
    """How outputs and tables name a model quantized to ``spec``."""
    if adaptive is not None:
        return f"adaptive-{'-'.join(map(str, _levels(adaptive)))}"
    if isinstance(spec, Budget):
        return spec.label
    if isinstance(spec, Plan):
        return "plan"
    if isinstance(spec, Scheme):
        plain = spec.name == "rtn" and not (spec.clip or spec.bias_correction or spec.awq)
        return spec.format if plain else f"{spec.name} {spec.format}"
    if isinstance(spec, str):
        return spec
    return "mixed"


def check_output(output: str | Path, overwrite: bool) -> Path:
    """The output folder, after refusing one that holds something unless ``overwrite``."""
    output = Path(output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not overwrite:
        raise AmpqError(f"{output} already exists; choose another --output or pass --overwrite")
    return output


def quantize(model: nn.Module, spec: Spec | None, *, calibration: Text | str | Windows | torch.Tensor | None = None,
             tokenizer=None, device: str | torch.device | None = None, algorithm: str | None = None,
             clip: bool = False, bias_correction: bool = False, awq: bool = False, activation: str | None = None,
             lm_head: bool | str = False, options: dict | None = None, compute_dtype: str | None = None,
             batch_size: int = 8, sequential: bool = True, on_layer=None, adaptive: str | list[int] | None = None,
             output: str | Path | None = None, overwrite: bool = False, resume: Resume | None = None,
             memory: MemoryCap | str | int | None = None, progress: bool = True,
             devices: str | list | None = None, max_gpu_memory: str | int | None = None,
             embeddings: str | None = None) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``spec`` says what each linear of the decoder blocks becomes:

    - a format name (``"int4-g128"``, see ``ampq formats``), the same for every linear;
    - a map from fnmatch patterns over module names to format names (first match wins, ``None``
      keeps the layer as it is);
    - a :class:`~ampq.schemes.Scheme` (``ampq.schemes.get_scheme("gptq")``): its format and method;
    - a :class:`~ampq.pipeline.plans.Plan`: a format and algorithm per layer;
    - a :class:`~ampq.pipeline.budget.Budget`: the plan of least estimated damage within it is
      made first (:func:`ampq.plan`), from the sensitivity measured on ``calibration``.

    ``calibration``: a text's name (``"mix"``, the CLI's default: wiki, code, technical and
    multilingual text; or one of them; windows of 512 tokens, as many as
    :func:`ampq.data.calibration_windows` gives the model: 32 up to 8192-wide linears), an :class:`ampq.Text`
    (read with ``tokenizer``), token windows, or an (n, T) tensor of token ids; needed by every
    method but plain round to nearest. ``device``: where to quantize (``"cpu"``, ``"cuda"``, ``"cuda:N"``,
    ``"auto"``; default: where the model is): every stage runs there, one decoder block at a time,
    while the weights stay where they are (the model comes back where it was); ``max_gpu_memory``
    (``"40GB"``) caps the device memory. Under torchrun (or ``ampq quantize --devices``) each rank
    takes its share of the work on its device (``devices``: ``"0,1"``, this rank's entry is its
    own) and the main rank writes the output: the same bytes for any number of ranks. ``algorithm`` (``rtn``, ``gptq``), ``clip``,
    ``bias_correction``, ``awq``, ``activation``, ``options`` and ``compute_dtype`` choose the method
    where the spec does not (:func:`ampq.pipeline.blockwise.quantize_blocks` tells each); the output
    head is quantized only with ``lm_head`` (``True``: in the spec's format for it, by round to
    nearest; a format name: in that one). ``adaptive`` (``"4:8"``) stores every layer at several
    precisions to switch between at run time (:func:`ampq.adapt`); ``spec`` is then the base format.
    ``embeddings`` (a format name, e.g. ``"q6_k"``) stores the token embedding table in that format,
    by round to nearest, last (:mod:`ampq.quant_embedding`; a tied head reads the same table); a
    Budget's or a Plan's ``embeddings`` is used where this is not given.

    ``output``: save the checkpoint there (with ``tokenizer``; its manifest carries the plan and
    the sensitivity table); the progress is recorded beside it after every block, so a killed run
    given the same arguments resumes. ``memory`` (a size like ``"2GB"`` or a
    :class:`~ampq.memory.MemoryCap`) keeps resident memory under a cap: load the model with
    ``ampq.load_model(..., lazy=True)``. The run's additions to the manifest are kept in
    ``model.ampq_manifest``.
    """
    started = time.perf_counter()
    if output is not None:
        output = check_output(output, overwrite)
    placement = placement_for(model, device, devices, parse_size(max_gpu_memory) if max_gpu_memory else None)
    ranks = placement.ranks
    ranks.barrier()  # every rank checked the output before the main one writes beside it
    progress = progress and ranks.main
    done = {**quantized_linears(model), **quantized_projections(model)}
    if done:
        raise AmpqError(f"this model is already quantized ({len(done)} quantized layers); quantize from the "
                        "unquantized model (a float folder, a hub id or a built-in name)")
    levels = _levels(adaptive) if adaptive is not None else None
    method = _method(spec, levels, algorithm=algorithm, clip=clip, bias_correction=bias_correction, awq=awq,
                     activation=activation, options=options)
    method["compute_dtype"] = compute_dtype
    if isinstance(memory, (str, int)):
        memory = MemoryCap(parse_size(memory), output.parent if output is not None else Path.cwd())
    if memory is not None and levels:
        raise AmpqError("--adaptive measures every level on the whole model; drop --adaptive or --max-memory")
    _check_ranks(model, ranks, spec, method, levels, memory)
    manifest: dict = {}
    given = calibration
    calibration = sized_for(calibration, model, CALIBRATION["window"]) if calibration is not None else None

    def announce() -> None:  # a count ampq chose is said, with how to choose another
        if progress and isinstance(calibration, Text):
            chosen = "" if isinstance(given, Text) and given.windows else (
                " (default: twice the widest linear's inputs in tokens, an expert's per routed token, at least 32; "
                "--calib-windows sets another)")
            fast = ("; its passes multiply in bf16 here (AMPQ_CALIB_DTYPE=float32 runs them in float32)"
                    if autocast_dtype(placement.device) is not None else "")
            print(f"calibration: {calibration.describe()}{chosen}{fast}", file=sys.stderr)

    formats = spec.format if isinstance(spec, Scheme) else spec
    if isinstance(spec, Budget):
        announce()
        with placement.stage("sensitivity"):
            formats, table = plan_with_table(model, spec, calibration, tokenizer, progress=progress,
                                             may_measure=memory is None, placement=placement)
        manifest["sensitivity"] = dataclasses.asdict(table)
    if isinstance(formats, Plan):
        manifest["plan"] = formats.to_dict()
    if levels:
        formats = formats or f"int{levels[0]}-g128"
    _check_formats(formats, levels)
    embeddings = _planned("embeddings", embeddings, spec, formats)
    if embeddings is not None:
        embedding_bytes_saved(model, embeddings)  # refuses a format the table cannot take before any work
    lm_head = _planned("head", lm_head if isinstance(lm_head, str) else None, spec, formats) or lm_head
    if lm_head is True and format_for(lm_head_name(model), formats) is None:
        raise AmpqError("lm_head=True takes the head's format from the spec, which names none for it; give the "
                        "format (CLI: --lm-head int8-g32-sym)")
    transform = formats.transform.get("name", "none") if isinstance(formats, Plan) else "none"
    needs = levels or method["clip"] or method["bias_correction"] or method["awq"] or (
        method["algorithm"] in NEEDS_CALIBRATION) or on_layer is not None or transform != "none" or (
        isinstance(formats, Plan) and any(p.algorithm in NEEDS_CALIBRATION or p.clip for p in formats.layers.values()))
    if needs and not isinstance(spec, Budget):
        announce()
    tokens = windows_of(calibration, tokenizer, "calib", **CALIBRATION) if needs else None
    if transform != "none":  # a plan measured on transformed weights is followed on them
        if tokens is None:
            raise AmpqError(f"this plan was made on the model after the {transform!r} transform, which needs "
                            "calibration text: pass calibration='mix' and the tokenizer (CLI: --calib mix)")
        ensure_transform(model, transform, tokens, progress=progress)
    if output is not None and resume is None:
        resume = _resume(model, output, formats, method, tokens, lm_head, levels, progress, ranks)
    if memory is not None and resume is not None:
        memory.spill_dir = resume.directory  # removed with the progress when the run finishes
    t_quantize = time.perf_counter()
    if levels:
        del method["bias_correction"]  # refused by _method: one precision's fit
        with placement.stage("quantize"):
            quantize_adaptive(model, levels, tokens, base_format=formats, lm_head=lm_head, resume=resume,
                              batch_size=batch_size, sequential=sequential, progress=progress, placement=placement,
                              **method)
        manifest.update(_adaptive_manifest(model, levels, formats, calibration))
        if progress:
            lo, hi = stored_range(model)
            print(f"adaptive: every layer stores levels {':'.join(map(str, levels))}; plans from {lo:.3f} to "
                  f"{hi:.3f} bits per weight can be switched to with ampq.adapt", file=sys.stderr)
    else:
        with placement.stage("quantize"):
            quantize_blocks(model, formats, calibration=tokens, lm_head=lm_head, batch_size=batch_size,
                            sequential=sequential, on_layer=on_layer, progress=progress, resume=resume,
                            memory=memory, placement=placement, **method)
    if embeddings is not None:
        with placement.stage("embeddings"):
            weights = weights_of(model)
            if weights is not None:  # a lazily loaded model reads its table now (and the tied head with it)
                weights.materialize(model, lambda n: n.startswith(_embedding_prefixes(model)))
            table = quantize_embeddings(model, embeddings)
        manifest["embeddings"] = embeddings
        if progress:
            print(f"embeddings: {table} stored in {embeddings}"
                  + (" (the head reads the same table)" if tied_embeddings(model) else ""), file=sys.stderr)
    towers = {t: sum(p.numel() for p in model.get_submodule(t).parameters()) for t in kept_towers(model)}
    if towers:  # a vision-language model: only its language model was quantized (the summary names them)
        manifest["kept_towers"] = towers
    model.ampq_manifest = manifest
    if progress:
        print(coverage(model).line(), file=sys.stderr)
    placement.print_report(progress)
    if output is not None and not ranks.main:
        if resume is not None:
            resume.finish()  # waits for the main rank's files
    elif output is not None:
        t_save = time.perf_counter()
        save(model, output, tokenizer, overwrite=overwrite, extra_manifest=manifest)
        if resume is not None:
            resume.finish()
        if progress:
            print(f"stage times: quantization {t_save - t_quantize:.1f} s, saving {time.perf_counter() - t_save:.1f} s, "
                  f"total {time.perf_counter() - started:.1f} s", file=sys.stderr)
    if memory is not None and progress:
        print(memory.report(), file=sys.stderr)
    return model


def _embedding_prefixes(model: nn.Module) -> tuple[str, ...]:
    emb = model.get_input_embeddings()
    return tuple(f"{n}." for n, m in model.named_modules() if m is emb or (tied_embeddings(model) and
                                                                           m is model.get_output_embeddings()))


def _planned(what: str, given: str | None, spec, formats) -> str | None:
    """The format of the embedding table or the head (``what``): the call's, else the budget's or
    the plan's; they must agree (a size budget counted the plan's)."""
    source = spec if isinstance(spec, Budget) else formats if isinstance(formats, Plan) else None
    planned = getattr(source, what, None)
    if given is not None and planned is not None and given != planned:
        flag = "--embeddings" if what == "embeddings" else "--lm-head"
        raise AmpqError(f"the plan was made with the {'embedding table' if what == 'embeddings' else 'head'} in "
                        f"{planned}, not {given}; drop {flag} or make the plan again with it")
    return given or planned


def _levels(adaptive: str | list[int]) -> list[int]:
    return parse_levels(adaptive if isinstance(adaptive, str) else ":".join(map(str, adaptive)))


def _method(spec, levels, *, algorithm, clip, bias_correction, awq, activation, options) -> dict:
    """The method keywords of :func:`quantize_blocks`: the call's, combined with a scheme's."""
    if isinstance(spec, Scheme):
        if algorithm is not None and algorithm != spec.algorithm:
            raise AmpqError(f"scheme {spec.name} uses {spec.algorithm}, not {algorithm}; drop algorithm= or give "
                            f"a format name instead of the scheme")
        method = spec.quantize_kwargs()
        method["clip"] |= clip
        method["bias_correction"] |= bias_correction
        method["awq"] |= awq
        method["activation"] = activation or method["activation"]
        method["options"] = {**method["options"], **(options or {})}
    else:
        if spec is not None and not isinstance(spec, (str, Mapping, Plan, Budget)):
            raise AmpqError(f"quantize takes a format name, a per-module map, a Scheme, a Plan or a Budget, not "
                            f"{type(spec).__name__}")
        method = {"algorithm": algorithm or ("gptq" if levels else "rtn"), "clip": clip,
                  "bias_correction": bias_correction, "awq": awq, "activation": activation, "options": options}
    if levels:
        if isinstance(spec, (Plan, Budget)) or (spec is not None and not isinstance(spec, (str, Scheme))):
            raise AmpqError("--adaptive stores every level and chooses at run time (ampq.adapt); drop --budget, "
                            "--max-size and --plan, or drop --adaptive")
        if method["algorithm"] not in ("gptq", "rtn") or method["awq"]:
            name = spec.name if isinstance(spec, Scheme) else method["algorithm"]
            raise AmpqError(f"--adaptive builds on a gptq or rtn base, not {name}; pass --scheme gptq or rtn")
        if method["bias_correction"]:
            raise AmpqError("--bias-correction fits one precision; adaptive layers switch between several, drop it")
    return method


def _check_formats(formats, levels) -> None:
    if formats is None:
        raise AmpqError("say what to quantize to: a format name, a per-module map, a Scheme, a Plan or a Budget")
    if isinstance(formats, str):
        try:
            fmt = get_format(formats)
        except AmpqError as e:
            if formats.strip().lower() in SCHEMES:
                raise AmpqError(f"{formats!r} is a scheme, not a format: pass ampq.schemes.get_scheme({formats!r}) "
                                f"(CLI: --scheme {formats})") from None
            raise e from None
        if levels and fmt.bits != levels[0]:
            raise AmpqError(f"--format {formats} is not a {levels[0]}-bit base for --adaptive "
                            f"{':'.join(map(str, levels))}; give a {levels[0]}-bit format (int{levels[0]}-g128, "
                            f"int{levels[0]}-g64, ...)")


def _check_ranks(model, ranks: Ranks, spec, method: dict, levels, memory) -> None:
    """What several ranks do not share yet, refused before any work."""
    if ranks.world == 1:
        return
    transform = spec.transform if isinstance(spec, Budget) else (
        spec.transform.get("name", "none") if isinstance(spec, Plan) else "none")
    if experts_modules(model):
        raise AmpqError("experts (MoE) are calibrated in one process; drop --devices/torchrun")
    if method["awq"] or transform != "none":
        raise AmpqError("AWQ's scale search runs in one process; drop --devices/torchrun or the AWQ scheme/transform")
    if levels:
        raise AmpqError("--adaptive runs in one process; drop --devices/torchrun or --adaptive")
    if memory is not None:
        raise AmpqError("--max-memory caps one process; drop --devices/torchrun or --max-memory")


def _resume(model, output: Path, formats, method: dict, tokens, lm_head: bool, levels, progress: bool,
            ranks: Ranks) -> Resume:
    """The progress record of a run writing ``output``: a killed run with the same model and
    arguments resumes."""
    calibration = None if tokens is None else hashlib.sha256(
        getattr(tokens, "tokens", tokens).numpy().tobytes()).hexdigest()
    target = formats.to_dict() if isinstance(formats, Plan) else formats
    key = {"ampq": __version__, "source": getattr(model.config, "ampq_source", None), "weights": fingerprint(model),
           "target": target, "options": method, "calibration": calibration, "lm_head": lm_head, "adaptive": levels}
    resume = Resume(progress_dir(output), key, ranks)
    if resume.done and progress:
        print(f"resuming: {resume.done} of {len(decoder_blocks(model))} blocks were finished by an earlier run "
              f"with these arguments ({resume.directory})", file=sys.stderr)
    return resume


def _adaptive_manifest(model: nn.Module, levels: list[int], base_format: str, calibration) -> dict:
    damage, nbytes = level_table(model)
    lo, hi = stored_range(model)
    text = calibration if isinstance(calibration, Text) else None
    return {"adaptive": {"levels": levels, "base_format": base_format, "bits_per_weight": [lo, hi]},
            "sensitivity": {"estimator": "fisher", "candidates": sorted(next(iter(damage.values()))),
                            "damage": damage, "nbytes": nbytes,
                            # as sensitivity tables write them: an expert projection's experts stacked by rows
                            "shapes": {n: [m.numel // m.shape[1], m.shape[1]] for n, m in nested_layers(model).items()},
                            "source": getattr(model.config, "ampq_source", None),
                            "calibration": {"text": text.source, "windows": text.windows, "window": text.window}
                            if text is not None else {}}}


def summary(model: nn.Module, name: str, spec_label: str, seconds: float, output: Path | None) -> str:
    """The line that says what a run made."""
    where = f"; saved to {output}" if output is not None else ""
    return (f"quantized {name} with {spec_label} in {seconds:.1f} s: {linear_bits(model):.3f} bits per weight "
            f"over the quantized layers, {model_bytes(model) / 1e6:.1f} MB in all{where}")
