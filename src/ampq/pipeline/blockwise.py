"""Block by block: replace the linears of a model's decoder blocks by QuantLinear, one block at a
time, with calibration where the algorithm needs it. :func:`ampq.quantize` (``pipeline/run.py``)
resolves what to do (a format, a scheme, a plan, a budget) and calls :func:`quantize_blocks`."""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from ampq.algorithms import NEEDS_CALIBRATION, get_algorithm
from ampq.algorithms.awq import awq_block
from ampq.algorithms.bias_correction import corrected_bias
from ampq.algorithms.clip import search_clip
from ampq.algorithms.gptq import gptq_many
from ampq.calibrate import Calibration
from ampq.dtypes import parse_dtype
from ampq.errors import AmpqError
from ampq.formats import get_format
from ampq.io.lazy import weights_of
from ampq.memory import MemoryCap, return_freed_memory, working_set
from ampq.models import decoder_blocks, fused_groups, lm_head_name, replace_module, tied_embeddings
from ampq.nn import QuantLinear
from ampq.pipeline.moe import ExpertCounts, keeps_router, quantize_experts
from ampq.pipeline.plans import Plan
from ampq.placement import Placement
from ampq.ranks import Ranks, owned_linears

FormatSpec = str | Mapping[str, str | None] | Plan


def format_for(name: str, spec: FormatSpec) -> str | None:
    """The format a layer gets: a single name for all, the plan's entry, or the first fnmatch
    pattern that matches (torchao-style per-module map; ``None`` keeps the layer as it is)."""
    if isinstance(spec, str):
        return spec
    if isinstance(spec, Plan):
        entry = spec.layers.get(name)
        return entry.format if entry else None
    for pattern, fmt in spec.items():
        if fnmatch.fnmatchcase(name, pattern):
            return fmt
    return None


def _layer_method(name: str, spec: FormatSpec, algorithm: str, clip: bool) -> tuple[str, bool]:
    """(algorithm, clip) for one layer: a plan says it per layer, otherwise the call's own."""
    if isinstance(spec, Plan) and name in spec.layers:
        return spec.layers[name].algorithm, spec.layers[name].clip
    return algorithm, clip


def _finite_weight(name: str, linear: nn.Linear) -> torch.Tensor:
    weight = linear.weight.detach().float()
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise AmpqError(f"layer {name} has {bad} NaN/Inf weights; repair or re-export the checkpoint before quantizing")
    return weight


def _shared_gptq(prefix: str, block: nn.Module, group: list[str], targets: dict[str, str], formats, algorithm: str,
                 clip: bool, options: dict | None, stats, fused: dict) -> dict[str, tuple]:
    """(codes, params) of the group's GPTQ linears from one column sweep over all of them
    (:func:`ampq.algorithms.gptq.gptq_many`: the same codes as one call per linear, in a fraction
    of the time). Only act-order GPTQ shares a sweep; other layers are left to quantize_linear."""
    jobs, subs = [], []
    for sub in group:
        name = f"{prefix}.{sub}"
        algo, layer_clip = _layer_method(name, formats, algorithm, clip)
        opts = (options or {}) if algo == algorithm else {}
        if algo != "gptq" or not opts.get("act_order", True) or set(opts) - {"act_order", "damp", "block_size"}:
            continue
        weight = _finite_weight(name, block.get_submodule(sub))
        fmt = get_format(targets[sub])
        if sub in fused:
            fmt = fmt.shared_over(fused[sub])
        try:
            ratios = search_clip(weight, fmt, stats) if layer_clip else 1.0
        except ValueError as e:
            raise AmpqError(f"layer {name} cannot be stored as {targets[sub]}: {e}") from None
        jobs.append((weight, fmt, ratios))
        subs.append((sub, {k: v for k, v in opts.items() if k != "act_order"}))
    solved = {}
    # one sweep per set of options (the same for every layer but under a plan mixing schemes)
    for kw in {tuple(sorted(o.items())) for _, o in subs}:
        mine = [i for i, (_, o) in enumerate(subs) if tuple(sorted(o.items())) == kw]
        for i, result in zip(mine, gptq_many([jobs[i] for i in mine], stats, codes=True, **dict(kw))):
            if result is not None:  # otherwise quantize_linear runs it alone and says why it fails
                solved[subs[i][0]] = (result.codes, result.params)
    return solved


def quantize_matrix(name: str, weight: torch.Tensor, fmt_name: str, algorithm: str = "rtn", stats=None, *,
                    clip: bool = False, activation: str | None = None, compute_dtype: str | None = None,
                    options: dict | None = None) -> QuantLinear:
    """One (out, in) weight that is no ``nn.Linear`` (an expert's projection), without a bias."""
    weight = weight.detach().float()
    if not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise AmpqError(f"layer {name} has {bad} NaN/Inf weights; repair or re-export the checkpoint before quantizing")
    fmt = get_format(fmt_name)
    try:
        ratios = search_clip(weight, fmt, stats) if clip else 1.0
        codes, params = get_algorithm(algorithm)(weight, fmt, stats, ratios, **(options or {}))
    except ValueError as e:
        raise AmpqError(f"layer {name} cannot be stored as {fmt_name}: {e}") from None
    return QuantLinear(weight.shape[1], weight.shape[0], fmt_name, fmt.pack(codes, params), None,
                       algorithm + ("+clip" if clip else ""), activation, None, compute_dtype)


def quantize_linear(name: str, linear: nn.Linear, fmt_name: str, algorithm: str = "rtn", stats=None, *,
                    clip: bool = False, bias_correction: bool = False, activation: str | None = None,
                    compute_dtype: str | None = None, options: dict | None = None,
                    solved: tuple | None = None, fused_with: list[torch.Tensor] | None = None) -> QuantLinear:
    """One linear in one format: clip search, the algorithm's codes, then bias correction.
    ``solved``: (codes, params) already chosen by a GPTQ sweep shared with other linears.
    ``fused_with``: the weights of the layers engines fuse it with (itself included), in the same
    format, which share what the format holds once per fused layer (NVFP4's global scale)."""
    weight = _finite_weight(name, linear)
    fmt = get_format(fmt_name)
    if fused_with:
        fmt = fmt.shared_over(fused_with)
    if solved is not None:
        codes, params = solved
    else:
        try:
            ratios = search_clip(weight, fmt, stats) if clip else 1.0
            codes, params = get_algorithm(algorithm)(weight, fmt, stats, ratios, **(options or {}))
        except ValueError as e:
            raise AmpqError(f"layer {name} cannot be stored as {fmt_name}: {e}") from None
    label = algorithm + ("+clip" if clip else "") + ("+bias" if bias_correction else "")
    layer = QuantLinear.from_linear(linear, fmt_name, codes, params, label, activation, compute_dtype)
    if bias_correction:
        deq = fmt.dequantize_codes(codes, params.values)
        bias = corrected_bias(weight, deq, layer.bias, stats).to(linear.weight.dtype)
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def quantize_blocks(model: nn.Module, formats: FormatSpec, *, algorithm: str = "rtn", calibration=None,
             clip: bool = False, bias_correction: bool = False, awq: bool = False,
             activation: str | None = None, lm_head: bool | str = False, options: dict | None = None,
             compute_dtype: str | None = None, batch_size: int = 8, sequential: bool = True,
             on_layer=None, progress: bool = True, resume=None, memory: MemoryCap | None = None,
             placement: Placement | None = None) -> nn.Module:
    """Quantize ``model`` in place and return it.

    ``formats``: one format name for every linear of the decoder blocks, or a map from fnmatch
    patterns over module names to format names (first match wins, ``None`` skips). ``algorithm``
    chooses the codes (``rtn``, ``gptq``); ``clip`` searches clipping ratios, ``bias_correction``
    restores each output's mean, ``sequential`` (default) measures each group of linears after
    the groups before it in the block were quantized, ``awq`` rescales input channels first (searched on every calibration
    token); all but plain RTN need
    ``calibration`` (token windows: a :class:`ampq.data.Windows` or an (n, T) tensor).
    ``compute_dtype`` (e.g. "bfloat16") makes the quantized matmuls run in that dtype whatever
    the activations' dtype. Embeddings and norms are never touched; the output head only with
    ``lm_head=True`` (round to nearest, in the spec's format for it; a format name gives that one; a
    tied head is untied). Blocks are done one at a time.
    ``on_layer(name, linear, quantized, stats)``, when given, returns what replaces each linear
    instead of ``quantized`` (adaptive checkpoints nest residuals there); with ``calibration`` it
    gets the layer's input statistics, whatever the algorithm. An expert's matrix comes to it as
    ``name`` "<projection>.<expert>" with its float (out, in) weight in place of the linear, and the
    statistics of the tokens routed to it (None where none were, or without calibration). ``resume`` (an
    :class:`ampq.resume.Resume`) records each finished block and restores those a killed run finished.
    ``memory`` (an :class:`ampq.memory.MemoryCap`) keeps the run under a resident-memory cap: with a
    model loaded with ``lazy=True`` each block's weights are read just before it is quantized, and
    calibration activations that do not fit beside the work go to disk. ``placement`` (an
    :class:`ampq.placement.Placement`) says where the work runs: each block moves to its device just
    before its work and back right after; under several ranks each rank runs its share of the
    calibration batches and quantizes its share of each group's linears, and every rank ends with
    the whole quantized model.
    """
    if isinstance(formats, Plan):
        names = [p.format for p in formats.layers.values()]
        algorithms = {p.algorithm for p in formats.layers.values()}
        clip = clip or any(p.clip for p in formats.layers.values())
    else:
        names = [formats] if isinstance(formats, str) else list(formats.values())
        algorithms = {algorithm}
    for f in names:
        if f is not None:
            get_format(f)  # fail on a bad name before any work
    for a in algorithms | {algorithm}:
        get_algorithm(a)
    if compute_dtype is not None:
        parse_dtype(compute_dtype)
    layer_kwargs = {"activation": activation, "compute_dtype": compute_dtype}
    needs_stats = bool(algorithms & NEEDS_CALIBRATION) or clip or bias_correction or awq or (
        on_layer is not None and calibration is not None)
    blocks = decoder_blocks(model)
    weights = weights_of(model)
    in_blocks = tuple(f"{prefix}." for prefix, _ in blocks)
    head = lm_head_name(model) if lm_head or weights is not None else None

    def before_blocks(name: str) -> bool:  # what runs before the first block: embeddings and the like
        return not name.startswith(in_blocks) and not (head and name.startswith(f"{head}.") and not tied_embeddings(model))

    placement = placement or Placement.of(model)
    store = None
    if memory is not None:
        window = getattr(calibration, "tokens", calibration).shape[1] if needs_stats and calibration is not None else 0
        head_bytes = _bytes(model, lambda n: n.startswith(f"{head}.")) if lm_head else 0
        store = _activation_store(model, blocks, formats, memory, batch_size, window, before_blocks, head_bytes,
                                  placement)
    elif needs_stats:
        store = placement.activation_store()
    if needs_stats:
        if calibration is None:
            raise AmpqError(f"{algorithm}{' with clip/bias correction/awq' if algorithm == 'rtn' else ''} needs "
                            "calibration text: pass calibration windows (CLI: --calib wiki)")
        tokens = getattr(calibration, "tokens", calibration)
        if weights is not None:
            weights.materialize(model, before_blocks)
        cal = Calibration(model, tokens, batch_size, store, placement)
        if weights is not None:
            weights.release(model, before_blocks)
            return_freed_memory()
    done = resume.done if resume is not None else 0
    counts = ExpertCounts()
    try:
        label = "+".join(sorted(algorithms))
        for i, (prefix, block) in enumerate(tqdm(blocks, desc=f"quantize ({label})", unit="block",
                                                 disable=not progress)):
            if i < done:  # finished by a run that was killed: as it was, without quantizing again
                resume.restore(i, block)
                if needs_stats and i == done - 1:
                    cal.restore_inputs(resume.inputs())
                continue
            if weights is not None:
                weights.materialize(model, lambda name, p=f"{prefix}.": name.startswith(p))
            with placement.onload(block):
                _quantize_block(prefix, block, formats, algorithm, clip, bias_correction, awq, options, layer_kwargs,
                                on_layer, cal if needs_stats else None, sequential, counts, placement.ranks)
            if resume is not None:
                resume.save(i, block, cal.inputs if needs_stats else None)
            if memory is not None:
                return_freed_memory()
    finally:
        if store is not None:
            if memory is not None:
                memory.spilled += store.spilled
            store.close()
    if progress and counts.line():
        print(counts.line(), file=sys.stderr)
    if progress and counts.matrices and (awq or bias_correction):
        print(f"experts: {' and '.join(n for n, on in (('AWQ', awq), ('bias correction', bias_correction)) if on)} "
              "applied to the linears only; the experts were quantized without it", file=sys.stderr)
    if lm_head:
        module = model.get_submodule(head)
        fmt = lm_head if isinstance(lm_head, str) else format_for(head, formats)
        if isinstance(module, nn.Linear) and fmt is not None:
            if weights is not None:
                weights.materialize(model, lambda name: name.startswith(f"{head}."))
            if getattr(model.config, "tie_word_embeddings", False):
                model.config.tie_word_embeddings = False
            with placement.onload(module):
                layer = quantize_linear(head, module, fmt, "rtn", **layer_kwargs)
                replace_module(model, head, layer.to(next(module.parameters()).device))
            if weights is not None:  # a tied head read the embedding too, which saving streams again
                weights.release(model, lambda name: not name.startswith(in_blocks))
                return_freed_memory()
    return model


def _activation_store(model, blocks, formats, memory: MemoryCap, batch_size: int, window: int, before_blocks,
                      head_bytes: int, placement: Placement):
    """Where calibration activations go under ``memory``: as many as fit beside the estimated work
    (refusing a cap below the work itself) stay in memory, the rest are spilled."""
    outside = _bytes(model, before_blocks) if window else 0
    need = working_set(model, blocks, batch_size, max(window, 1), outside, _quantized_bytes(blocks, formats), head_bytes)
    limit = memory.allowance(need, "quantizing one block at a time")
    if memory.activations is not None:
        limit = min(limit, memory.activations)
    return placement.activation_store(limit, memory.spill_dir)


def _bytes(model: nn.Module, wanted) -> int:
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if wanted(name) and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.dtype.itemsize
    return total


def _quantized_bytes(blocks, formats) -> int:
    """What the quantized linears of every block will hold (a layer left as it is: its float weight)."""
    total = 0
    for prefix, block in blocks:
        for sub, m in block.named_modules():
            if isinstance(m, nn.Linear):
                fmt = format_for(f"{prefix}.{sub}", formats)
                total += get_format(fmt).nbytes(tuple(m.weight.shape)) if fmt else m.weight.numel() * m.weight.dtype.itemsize
    return total


def _fused_weights(block, targets: dict[str, str]) -> dict[str, list[torch.Tensor]]:
    """For each linear that engines fuse with others of the same format (q/k/v, gate/up), the
    float weights of all of them, taken before any is replaced."""
    fused = {}
    for group in fused_groups(list(targets)):
        for fmt in {targets[s] for s in group}:
            members = [s for s in group if targets[s] == fmt]
            if len(members) > 1:
                weights = [block.get_submodule(s).weight for s in members]
                fused.update({s: weights for s in members})
    return fused


def _quantize_block(prefix, block, formats, algorithm, clip, bias_correction, awq, options, layer_kwargs,
                    on_layer, cal, sequential, counts: ExpertCounts, ranks: Ranks) -> None:
    """One decoder block's linears and experts; with calibration (``cal``), the inputs then move
    past the block. Routers are kept unless the spec names them. Under several ranks each linear is
    quantized by one rank and sent to the others."""
    targets = {sub: format_for(f"{prefix}.{sub}", formats) for sub, m in block.named_modules()
               if isinstance(m, nn.Linear) and not keeps_router(block, prefix, sub, formats)}
    targets = {sub: f for sub, f in targets.items() if f is not None}
    fused = _fused_weights(block, targets)

    def choose(name: str):  # an expert projection's format and method
        algo, layer_clip = _layer_method(name, formats, algorithm, clip)
        return format_for(name, formats), algo, layer_clip, options if algo == algorithm else None

    def make(name, weight, fmt, algo, stats, layer_clip, layer_options, observed=None):
        layer = quantize_matrix(name, weight, fmt, algo, stats, clip=layer_clip, options=layer_options, **layer_kwargs)
        return on_layer(name, weight, layer, observed) if on_layer else layer

    if cal is None:
        for sub, fmt in targets.items():
            name = f"{prefix}.{sub}"
            algo, _ = _layer_method(name, formats, algorithm, clip)
            linear = block.get_submodule(sub)
            layer = quantize_linear(name, linear, fmt, algo, options=options if algo == algorithm else None,
                                    fused_with=fused.get(sub), **layer_kwargs)
            replace_module(block, sub, on_layer(name, linear, layer, None) if on_layer else layer)
        quantize_experts(prefix, block, choose, make, None, counts)
        return
    if awq:
        awq_block(block, cal, targets)
    groups = cal.groups(block)
    # sequential: each group measured after the groups before it were quantized (one partial
    # pass per group); otherwise all from the float block in one pass, as llm-compressor does
    shared = None if sequential else cal.stats_all(block, groups)
    for whole in groups:
        group = [sub for sub in whole if sub in targets]
        if not group:
            continue
        owners = owned_linears(block, [group], ranks)  # a group's linears wait for the same statistics
        stats = cal.stats(block, group) if shared is None else shared[whole[0]]
        solved = _shared_gptq(prefix, block, [sub for sub in group if owners[sub] == ranks.rank], targets, formats,
                              algorithm, clip, options, stats, fused)
        done = {}
        for sub in group:
            if owners[sub] != ranks.rank:
                continue
            name = f"{prefix}.{sub}"
            algo, layer_clip = _layer_method(name, formats, algorithm, clip)
            linear = block.get_submodule(sub)
            layer = quantize_linear(name, linear, targets[sub], algo, stats, clip=layer_clip,
                                    bias_correction=bias_correction,
                                    options=options if algo == algorithm else None, solved=solved.get(sub),
                                    fused_with=fused.get(sub), **layer_kwargs)
            done[sub] = on_layer(name, linear, layer, stats) if on_layer else layer
        for sub in group:
            if ranks.world > 1:  # travels on the CPU, comes back to this rank's device
                mine = done[sub].cpu() if sub in done else None
                done[sub] = ranks.share(mine, owners[sub]).to(cal.device)
            replace_module(block, sub, done[sub])
    quantize_experts(prefix, block, choose, make, cal, counts, observe=on_layer is not None)
    cal.advance(block)

