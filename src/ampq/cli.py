"""The `ampq` command line: quantize, plan, eval, inspect, report, formats, schemes, generate."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from ampq.errors import AmpqError
from ampq import atomic


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--corpus", default="wiki", help="comma-separated texts to evaluate on: built-in "
                   "wiki, c4, tiny, code, technical, multilingual, or a text file (default: wiki)")
    p.add_argument("--window", type=int, default=512, help="tokens per evaluation window (default 512)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--windows", type=int, default=32, help="number of windows per text (default 32)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")


def _evaluate_pair(model, reference, tokenizer, args) -> list[dict]:
    from ampq.data import make_windows
    from ampq.evaluate import Reference, evaluate

    results = []
    for corpus in [c.strip() for c in args.corpus.split(",") if c.strip()]:
        windows = make_windows(tokenizer, corpus, "eval", args.window, args.windows, args.stride)
        ref = Reference(reference, windows) if reference is not None else None
        q = evaluate(model, windows, ref)
        results.append({"corpus": corpus, "model": q.as_dict(),
                        "reference": ref.quality.as_dict() if ref is not None else None})
    return results


def _quality_table(title: str, rows_meta: list[tuple[str, object, float, int]], results: list[dict]) -> None:
    from ampq.report import print_table

    corpora = [r["corpus"] for r in results]
    columns = ["model", "bits/weight (linears)", "model MB"] + [f"ppl {c}" for c in corpora] + ["KL", "top-1"]
    rows = []
    for label, key, bits, nbytes in rows_meta:
        qs = [r[key] for r in results]
        if any(q is None for q in qs):
            continue
        kl = sum(q["kl"] for q in qs) / len(qs) if qs[0]["kl"] is not None else None
        top1 = sum(q["top1"] for q in qs) / len(qs) if qs[0]["top1"] is not None else None
        rows.append([label, bits, nbytes / 1e6] + [q["perplexity"] for q in qs] + [kl, top1])
    q0 = results[0]["model"]
    note = (f"perplexity over {q0['tokens']} scored tokens per text, window {q0['window']}, stride "
            f"{q0['stride']}, held-out half of each text; KL(original || model) in nats per token, "
            f"averaged over texts")
    print_table(title, columns, rows, note)


def _resume(model, output: Path, args, target, kwargs: dict, calibration):
    """The progress record of this run: a killed run with the same model and arguments resumes."""
    import hashlib

    from ampq import __version__
    from ampq.models import decoder_blocks
    from ampq.resume import Resume, fingerprint, progress_dir

    tokens = None if calibration is None else hashlib.sha256(calibration.tokens.numpy().tobytes()).hexdigest()
    key = {"ampq": __version__, "model": args.model, "weights": fingerprint(model), "dtype": args.dtype,
           "target": target if isinstance(target, str) else target.to_dict(), "options": kwargs,
           "calibration": tokens, "lm_head": args.lm_head, "adaptive": args.adaptive}
    resume = Resume(progress_dir(output), key)
    if resume.done:
        print(f"resuming: {resume.done} of {len(decoder_blocks(model))} blocks were finished by an earlier run "
              f"with these arguments ({resume.directory})", file=sys.stderr)
    return resume


def cmd_quantize(args) -> int:
    import ampq
    from ampq.report import block_linear_names, linear_bits, model_bytes
    from ampq.schemes import get_scheme

    scheme = get_scheme(args.scheme or ("gptq" if args.adaptive else "rtn"))
    mixed = args.budget is not None or args.max_size is not None or args.plan is not None
    if mixed and args.format:
        raise AmpqError("--format picks one format for every layer; drop it when giving --budget, --max-size or --plan")
    levels = None
    if args.adaptive:
        from ampq.nested import parse_levels

        if mixed:
            raise AmpqError("--adaptive stores every level and chooses at run time (ampq.adapt); drop --budget, "
                            "--max-size and --plan, or drop --adaptive")
        if scheme.name not in ("gptq", "rtn"):
            raise AmpqError(f"--adaptive builds on a gptq or rtn base, not {scheme.name}; pass --scheme gptq or rtn")
        levels = parse_levels(args.adaptive)
        args.format = args.format or f"int{levels[0]}-g128"
        if ampq.get_format(args.format).bits != levels[0]:
            raise AmpqError(f"--format {args.format} is not a {levels[0]}-bit base for --adaptive {args.adaptive}; "
                            f"give a {levels[0]}-bit format (int{levels[0]}-g128, int{levels[0]}-g64, ...)")
    args.format = args.format or scheme.format
    ampq.get_format(args.format)
    kwargs = scheme.quantize_kwargs()
    kwargs["clip"] |= args.clip
    kwargs["bias_correction"] |= args.bias_correction
    if args.in_order:
        kwargs["options"]["act_order"] = False
    kwargs["compute_dtype"] = args.compute_dtype
    label = args.format if scheme.name == "rtn" and not (args.clip or args.bias_correction) else f"{scheme.name} {args.format}"
    if levels:
        label = f"adaptive-{'-'.join(map(str, levels))}"
    if mixed:
        label = f"ampq-{args.budget}bpw" if args.budget is not None else (
            f"ampq-{args.max_size}" if args.max_size is not None else f"plan-{Path(args.plan).stem}")
    output = Path(args.output or f"{Path(args.model).name.removesuffix('.gguf')}-{label.replace(' ', '-')}")
    if output.exists() and any(output.iterdir()) and not args.overwrite:
        raise AmpqError(f"{output} already exists; choose another --output or pass --overwrite")
    memory = _memory_cap(args, output)
    model, tok = ampq.load_model(args.model, args.dtype, lazy=memory is not None)
    from ampq.nn import quantized_linears

    if quantized_linears(model):
        raise AmpqError(f"{args.model} is already quantized ({len(quantized_linears(model))} quantized layers); "
                        "quantize from the unquantized model (a float folder, a hub id or a built-in name)")
    names = block_linear_names(model)
    original = copy.deepcopy(model) if args.eval else None
    orig_bits, orig_bytes = linear_bits(model, names), model_bytes(model)
    calibration = None
    t0 = time.perf_counter()
    target = args.format
    extra_manifest = {}
    if mixed:
        target, table = _plan(model, tok, args)
        extra_manifest["plan"] = target.to_dict()
        if table is not None:
            extra_manifest["sensitivity"] = dataclasses.asdict(table)
        kwargs["algorithm"] = "rtn"
    needs = kwargs["clip"] or kwargs["bias_correction"] or scheme.needs_calibration or levels or (
        mixed and any(p.algorithm != "rtn" or p.clip for p in target.layers.values()))
    if needs:
        from ampq.data import make_windows

        calibration = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)
    t_quantize = time.perf_counter()
    if levels:
        from ampq.adapt import level_table, nested_layers, quantize_adaptive, stored_range

        if kwargs.pop("bias_correction"):
            raise AmpqError("--bias-correction fits one precision; adaptive layers switch between several, drop it")
        resume = _resume(model, output, args, target, kwargs, calibration)
        quantize_adaptive(model, levels, calibration, base_format=target, lm_head=args.lm_head, resume=resume, **kwargs)
        damage, nbytes = level_table(model)
        lo, hi = stored_range(model)
        extra_manifest["adaptive"] = {"levels": levels, "base_format": target, "bits_per_weight": [lo, hi]}
        extra_manifest["sensitivity"] = {"estimator": "fisher", "candidates": sorted(next(iter(damage.values()))),
                                         "damage": damage, "nbytes": nbytes,
                                         "shapes": {n: list(m.shape) for n, m in nested_layers(model).items()},
                                         "source": args.model, "calibration": {"text": args.calib,
                                                                               "windows": args.calib_windows,
                                                                               "window": args.calib_window}}
        print(f"adaptive: every layer stores levels {':'.join(map(str, levels))}; plans from {lo:.3f} to "
              f"{hi:.3f} bits per weight can be switched to with ampq.adapt", file=sys.stderr)
    else:
        resume = _resume(model, output, args, target, kwargs, calibration)
        if memory is not None:
            memory.spill_dir = resume.directory  # removed with the progress when the run finishes
        ampq.quantize(model, target, calibration=calibration, lm_head=args.lm_head, resume=resume, memory=memory,
                      **kwargs)
    t_save = time.perf_counter()
    ampq.save(model, output, tok, overwrite=args.overwrite, extra_manifest=extra_manifest)
    if resume is not None:
        resume.finish()
    seconds = time.perf_counter() - t0
    print(f"stage times: quantization {t_save - t_quantize:.1f} s, saving {time.perf_counter() - t_save:.1f} s, "
          f"total {seconds:.1f} s", file=sys.stderr)
    if memory is not None:
        print(memory.report(), file=sys.stderr)
    bits, nbytes = linear_bits(model), model_bytes(model)
    print(f"quantized {args.model} with {label} in {seconds:.1f} s: {bits:.3f} bits per weight "
          f"over the quantized linears, {nbytes / 1e6:.1f} MB in all; saved to {output}")
    if args.eval:
        results = _evaluate_pair(model, original, tok, args)
        _quality_table(f"{args.model}: {label} against the original",
                       [("original", "reference", orig_bits, orig_bytes), (label, "model", bits, nbytes)],
                       results)
        if args.json_out:
            _write_json(args.json_out, {"model": args.model, "format": args.format, "scheme": scheme.name,
                                        "seconds": seconds,
                                        "bits_per_weight": bits, "model_bytes": nbytes,
                                        "original_bytes": orig_bytes, "results": results})
    return 0


def _memory_cap(args, output: Path):
    """The cap of ``--max-memory``, after refusing what cannot run under one."""
    if args.max_memory is None:
        return None
    from ampq.memory import MemoryCap
    from ampq.planner import parse_size

    if args.eval:
        raise AmpqError("--eval keeps the original model in memory beside the quantized one; drop --eval or "
                        f"--max-memory, and score the result afterwards with `ampq eval {output}`")
    if args.adaptive:
        raise AmpqError("--adaptive measures every level on the whole model; drop --adaptive or --max-memory")
    return MemoryCap(parse_size(args.max_memory), output.parent)


def _plan(model, tok, args):
    """The plan of a mixed-precision run: read from --plan, or allocated for --budget/--max-size
    from the (cached) sensitivity table."""
    from ampq import planner
    from ampq.plan import Plan

    if args.plan:
        return Plan.load(args.plan), None
    names = _block_linears(model)
    t0 = time.perf_counter()
    table = planner.sensitivity(model, tok, _candidates(args), calib=args.calib, windows=args.calib_windows,
                                window=args.calib_window, estimator=args.estimator,
                                table_path=Path(args.sensitivity) if args.sensitivity else None,
                                may_measure=getattr(args, "max_memory", None) is None)
    t1 = time.perf_counter()
    plan = planner.plan_for_budget(table, bits_per_weight=args.budget, max_size=args.max_size,
                                   fixed=planner.fixed_bytes(model, names), tied=not args.untied)
    print(f"stage times: sensitivity {t1 - t0:.1f} s (0 when reused from the cache), allocation "
          f"{1e3 * (time.perf_counter() - t1):.0f} ms", file=sys.stderr)
    print(f"plan: {planner.bits_of(plan, table):.3f} bits per weight, {plan.total_bytes / 1e6:.1f} MB of linears; "
          + ", ".join(f"{k} x{v}" for k, v in planner.describe(plan).items()), file=sys.stderr)
    return plan, table


def _block_linears(model) -> list[str]:
    from ampq.report import block_linear_names

    return block_linear_names(model)


def _candidates(args) -> list[str] | None:
    return [c for c in args.candidates.split(",") if c.strip()] if args.candidates else None


def cmd_plan(args) -> int:
    import ampq
    from ampq.report import print_table

    model, tok = ampq.load_model(args.model, args.dtype)
    plan, _ = _plan(model, tok, args)
    out = plan.save(args.output)
    rows = [[name, p.format, p.algorithm + ("+clip" if p.clip else ""), p.bytes, p.damage] for name, p in plan.layers.items()]
    print_table(f"plan for {args.model} ({plan.budget})", ["layer", "format", "algorithm", "bytes", "est. damage"], rows,
                f"{plan.total_bytes:,} bytes of linears; written to {out}; quantize with: ampq quantize {args.model} --plan {out}")
    return 0


def cmd_eval(args) -> int:
    import ampq
    from ampq.report import linear_bits, model_bytes

    model, tok = ampq.load_model(args.target, keep_quantized=True)
    ref_spec = args.reference or getattr(model.config, "ampq_source", None)
    reference = None
    if ref_spec and ref_spec != args.target:
        reference, ref_tok = ampq.load_model(ref_spec)
        tok = tok or ref_tok  # a checkpoint saved without its tokenizer reads text as its source does
    elif args.reference is None and ref_spec is None:
        print("no --reference given and the checkpoint names no source: reporting perplexity only", file=sys.stderr)
    results = _evaluate_pair(model, reference, tok, args)
    rows = [(str(args.target), "model", linear_bits(model), model_bytes(model))]
    if reference is not None:
        rows.insert(0, (f"original ({ref_spec})", "reference",
                        linear_bits(reference), model_bytes(reference)))
    _quality_table(f"evaluation of {args.target}", rows, results)
    if args.json_out:
        _write_json(args.json_out, {"target": args.target, "reference": ref_spec, "results": results})
    return 0


def cmd_inspect(args) -> int:
    from ampq.io.checkpoint import verify_checkpoint
    from ampq.report import print_table

    manifest = verify_checkpoint(args.directory)
    layers = manifest.get("layers", {})
    rows = [[name, "+".join([e["format"]] + [r["format"] for r in (e.get("nested") or {}).get("residuals", [])]),
             e["algorithm"], "x".join(map(str, e["shape"])), e["bytes"], e["bits_per_weight"]]
            for name, e in layers.items()]
    total_files = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".safetensors"))
    q_bytes = sum(e["bytes"] for e in layers.values())
    q_weights = sum(e["shape"][0] * e["shape"][1] for e in layers.values())
    rows.append(["all quantized linears", "", "", f"{q_weights:,} weights", q_bytes,
                 8 * q_bytes / q_weights if q_weights else None])
    print_table(f"{args.directory} (ampq {manifest.get('ampq_version')}, source {manifest.get('source')})",
                ["layer", "format", "algorithm", "shape", "bytes", "bits/weight"], rows,
                f"{len(manifest['tensors'])} tensors, {total_files:,} bytes of safetensors; every hash verified")
    return 0


def cmd_bench(args) -> int:
    import torch

    import ampq
    from ampq import bench
    from ampq.report import linear_bits, print_table

    if args.threads:
        torch.set_num_threads(args.threads)
    baseline = bench.resident_bytes()
    model, _ = ampq.load_model(args.model, args.dtype, keep_quantized=True)
    model.to(args.device)
    try:
        batches = tuple(int(b) for b in args.batch.split(","))
    except ValueError:
        raise AmpqError(f"--batch takes comma-separated integers, like 1,4,16; got {args.batch!r}") from None
    rows = bench.bench(model, batches=batches, prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                       repeats=args.repeats, baseline_rss=baseline)
    bits = linear_bits(model)
    table = [[r.batch, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.latency_p50_ms, r.latency_p99_ms,
              r.bandwidth_gb_s, r.predicted_bytes / 1e6, r.measured_bytes / 1e6 if r.measured_bytes else None]
             for r in rows]
    print_table(f"{args.model}: {bits:.2f} bits per weight over the block linears, {torch.get_num_threads()} threads",
                ["batch", "prefill tok/s", "decode tok/s", "p50 ms", "p99 ms", "weights GB/s", "predicted MB",
                 "measured MB"], table,
                f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, medians of {args.repeats} runs after a "
                "warm-up; weights GB/s = bytes of weights read per decoding step / step time; predicted = weights + "
                "KV cache; measured = resident memory at the end of decoding minus before loading (CPU) or peak allocated (GPU)")
    result = {"model": args.model, "bits_per_weight": bits, "device": args.device, "threads": torch.get_num_threads(),
              "dtype": str(next(model.parameters()).dtype), "rows": [r.as_dict() for r in rows]}
    if args.json_out:
        _write_json(args.json_out, result)
    if args.plot:
        bench.plot({args.model: result["rows"]}, args.plot)
    return 0


def cmd_verify(args) -> int:
    from ampq.formats import get_format
    from ampq.io.checkpoint import verify_checkpoint

    manifest = verify_checkpoint(args.directory)
    layers = manifest.get("layers", {})
    if not isinstance(layers, dict):
        raise AmpqError(f"{args.directory}/ampq.json has a malformed 'layers' table; re-create the checkpoint")
    tensors = manifest["tensors"]
    for name, e in layers.items():
        try:
            shape = tuple(e["shape"])
            held = sum(_tensor_bytes(tensors[f"{name}.{k}"]) for k in e["tensors"])
            if held != get_format(e["format"]).nbytes(shape):
                raise ValueError(f"{e['format']} of {shape} needs {get_format(e['format']).nbytes(shape)} bytes, "
                                 f"the checkpoint holds {held}")
        except (KeyError, TypeError, ValueError, AmpqError) as err:
            raise AmpqError(f"{args.directory}: layer {name!r} in ampq.json does not match the stored tensors "
                            f"({' '.join(str(err).split())[:200]})") from None
    total = sum(f["bytes"] for f in manifest["files"].values())
    print(f"{args.directory}: verified {len(manifest['files'])} files ({total:,} bytes), {len(tensors)} tensors "
          f"and {len(layers)} quantized layers against ampq.json (SHA-256 of every file and tensor)")
    return 0


def _tensor_bytes(entry: dict) -> int:
    import math

    import torch

    dtype = getattr(torch, str(entry["dtype"]), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {entry['dtype']!r}")
    return math.prod(entry["shape"]) * dtype.itemsize


def cmd_report(args) -> int:
    from ampq import figures
    from ampq.io.checkpoint import verify_checkpoint
    from ampq.sensitivity import SensitivityTable

    manifest = verify_checkpoint(args.directory)
    out = Path(args.output or f"{Path(args.directory).resolve()}-report")
    out.mkdir(parents=True, exist_ok=True)
    written = [figures.allocation_heatmap(manifest["layers"], out / "allocation.png",
                                          f"{Path(args.directory).name}: bits per weight by layer")]
    if args.sensitivity:
        table = SensitivityTable.load(args.sensitivity)
    elif manifest.get("sensitivity"):
        table = SensitivityTable(**manifest["sensitivity"])
    else:
        table = None
        print("no sensitivity table in this checkpoint (it was not quantized to a budget): pass --sensitivity "
              "FILE for the sensitivity figure", file=sys.stderr)
    if table is not None:
        written.append(figures.sensitivity_figure(table, out / "sensitivity.png"))
    if args.pareto:
        try:
            results = json.loads(Path(args.pareto).read_text())
            series, original = pareto_series(results, args.model_name or manifest.get("source"))
        except (OSError, ValueError, KeyError) as e:
            raise AmpqError(f"{args.pareto} is not a results file of benchmarks/pareto.py ({e})") from None
        written.append(figures.pareto_figure(series, out / "pareto.png", original=original,
                                             title=f"{args.model_name or manifest.get('source')}: quality (wiki) against size"))
    for path in written:
        print(f"wrote {path}")
    return 0


def pareto_series(results: dict, model: str | None) -> tuple[dict[str, list[tuple[float, float, float]]], float | None]:
    """(bits, wiki perplexity, wiki KL) by label from benchmarks/pareto.py's JSON, for one model."""
    rows = [r for r in results["rows"] if model is None or r["model"] == model or Path(str(model)).name == r["model"]]
    if not rows:
        raise KeyError(f"no rows for model {model}")
    series: dict[str, list[tuple[float, float, float]]] = {}
    for r in rows:
        series.setdefault(r["label"], []).append((r["bits_per_weight"], r["wiki"]["perplexity"], r["wiki"].get("kl")))
    return series, rows[0].get("wiki_original", {}).get("perplexity")


def cmd_formats(args) -> int:
    from ampq.formats import STANDARD_FORMATS, get_format
    from ampq.report import print_table

    shape = (4096, 4096)
    rows = [[name, type(get_format(name)).__name__.removesuffix("Format"), get_format(name).bits_per_weight(shape)]
            for name in STANDARD_FORMATS]
    print_table("number formats (any bits/group size of a family works: int3-g32, nf4-b128, e3m2-ch ...)",
                ["name", "family", "bits/weight at 4096x4096"], rows)
    return 0


def cmd_schemes(args) -> int:
    from ampq.report import print_table
    from ampq.schemes import ALIASES, SCHEMES

    aliases = {}
    for alias, target in ALIASES.items():
        aliases.setdefault(target, []).append(alias)
    rows = [[s.name, s.format, "yes" if s.needs_calibration else "no", ", ".join(aliases.get(s.name, [])), s.description]
            for s in SCHEMES.values()]
    print_table("quantization schemes (`--format` picks another format for any of them)",
                ["scheme", "format", "calibration", "also called", "what"], rows)
    return 0


def cmd_export(args) -> int:
    from ampq.export import export_compressed_tensors, export_gguf

    if args.to == "gguf":
        summary = export_gguf(args.directory, args.out, nearest=args.nearest, overwrite=args.overwrite)
    else:
        summary = export_compressed_tensors(args.directory, args.out, nearest=args.nearest, overwrite=args.overwrite)
    print(summary["line"])
    for warning in summary["warnings"]:
        print(f"ampq: warning: {warning}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    import torch

    import ampq

    model, tok = ampq.load_model(args.model, keep_quantized=True)
    if tok is None:
        raise AmpqError(f"{args.model} has no tokenizer to read the prompt with; re-save it with its tokenizer")
    messages = [{"role": "user", "content": args.prompt}]
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if args.adapt_memory or args.adapt_budget is not None:
        return _generate_adaptive(model, tok, ids, args)
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return 0


def _generate_adaptive(model, tok, ids, args) -> int:
    """Greedy decoding one token at a time, the memory policy consulted before every step."""
    import torch

    from ampq.adapt import MemoryTarget, adapt, stored_range
    from ampq.report import linear_bits, model_bytes

    lo, hi = stored_range(model)
    print(f"adaptive model: {lo:.3f} to {hi:.3f} bits per weight stored, now {linear_bits(model):.3f} "
          f"({model_bytes(model) / 1e6:.1f} MB)", file=sys.stderr)
    if args.adapt_budget is not None:
        _print_switch("start", adapt(model, args.adapt_budget), model)
    policy = MemoryTarget(args.adapt_memory) if args.adapt_memory else None
    eos = tok.eos_token_id
    past, step_ids, new = {}, ids, []
    with torch.inference_mode():
        for step in range(args.max_new_tokens):
            if policy is not None:
                switch = policy(model)
                if switch is not None:
                    _print_switch(f"step {step}", switch, model)
                    if model_bytes(model) > policy.target(model):
                        print(f"  {model_bytes(model) / 1e6:.1f} MB is the smallest this checkpoint stores, above "
                              f"the {policy.target(model) / 1e6:.1f} MB target", file=sys.stderr)
            out = model(input_ids=step_ids, use_cache=True, **past)
            # transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`
            past = {"cache": out.cache} if getattr(out, "cache", None) is not None else {
                "past_key_values": out.past_key_values}
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if eos is not None and int(token) == eos:
                break
            new.append(int(token))
            step_ids = token
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def _print_switch(when: str, switch, model) -> None:
    from ampq.report import linear_bits, model_bytes

    print(f"{when}: switched {switch.changed} layers in {1e3 * switch.seconds:.0f} ms: linears "
          f"{switch.bytes_before / 1e6:.1f} -> {switch.bytes_after / 1e6:.1f} MB, {linear_bits(model):.3f} bits per "
          f"weight, model {model_bytes(model) / 1e6:.1f} MB, estimated KL {switch.predicted_damage:.4f}", file=sys.stderr)


def _write_json(path: str, data: dict) -> None:
    atomic.write_text(path, json.dumps(data, indent=2))


def _add_budget_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--budget", type=float, default=None,
                   help="AMPQ: average bits per weight over the quantized linears, everything stored counted")
    p.add_argument("--max-size", default=None, help="AMPQ: size of the whole model on disk, e.g. 90MB")
    p.add_argument("--candidates", default=None, help="AMPQ: comma-separated FORMAT[:ALGORITHM[+clip]] "
                   "candidates (default: int2-g64:gptq, int3-g128:gptq ... int8-ch:rtn, bf16)")
    p.add_argument("--sensitivity", default=None, help="AMPQ: sensitivity table to reuse or write "
                   "(default: cached per model, candidates and calibration)")
    p.add_argument("--estimator", default="fisher", choices=["fisher", "hessian"],
                   help="AMPQ: sensitivity estimate: Fisher-weighted output error in nats of KL (default), or the "
                   "plain Hessian output error (no backward passes)")
    p.add_argument("--untied", action="store_true", help="AMPQ: let q/k/v and gate/up take different formats")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ampq", description="Quantize transformer language models and run them.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="built-in name (smollm2-135m, qwen2.5-coder-0.5b), HF folder, .gguf file or hub id")
    q.add_argument("-s", "--scheme", default=None, help="technique: rtn (default; gptq with --adaptive), gptq, awq, eetq, llm-int8, "
                   "bnb-nf4, bnb-fp4, fp8, fp8-w8a8 ... (see `ampq schemes`; TGI's --quantize names work too)")
    q.add_argument("-f", "--format", default=None, help="number format (default: the scheme's, int4-g128 for rtn; see `ampq formats`)")
    q.add_argument("--calib", default="wiki", help="calibration text: built-in corpus or file (default wiki, first half)")
    q.add_argument("--calib-windows", type=int, default=128, help="calibration windows (default 128)")
    q.add_argument("--calib-window", type=int, default=512, help="tokens per calibration window (default 512)")
    q.add_argument("--clip", action="store_true", help="search clipping ratios per group (needs calibration)")
    q.add_argument("--bias-correction", action="store_true", help="correct each output's mean shift (needs calibration)")
    q.add_argument("--in-order", action="store_true", help="GPTQ: visit columns in order and fit each group "
                   "when reached, instead of act-order with static groups (the default)")
    _add_budget_args(q)
    q.add_argument("--adaptive", default=None, metavar="LOW:HIGH",
                   help="store every layer at several precisions (e.g. 4:8 or 3:5:8: a LOW-bit base plus residual "
                        "codes), to switch between at run time with ampq.adapt or `ampq generate --adapt-memory`")
    q.add_argument("--plan", help="follow this plan (JSON from `ampq plan`, or written by hand)")
    q.add_argument("-o", "--output", help="checkpoint folder (default: ./MODEL-FORMAT)")
    q.add_argument("--dtype", default=None, help="dtype of the unquantized parts: float32 (default), bfloat16, float16")
    q.add_argument("--compute-dtype", default=None, help="dtype the quantized matmuls run in "
                   "(bitsandbytes' compute_dtype: bfloat16, float16, float32; default: the activations')")
    q.add_argument("--lm-head", action="store_true", help="quantize the output head too")
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="keep resident memory under SIZE (e.g. 2GB): weights are read from the safetensors one "
                        "block at a time, calibration activations that do not fit go to disk beside the output")
    q.add_argument("--eval", action="store_true", help="evaluate against the original and print the table")
    _add_eval_args(q)
    q.set_defaults(func=cmd_quantize)

    pl = sub.add_parser("plan", help="measure sensitivity and allocate formats under a budget, without quantizing")
    pl.add_argument("model")
    pl.add_argument("-o", "--output", default="plan.json", help="plan file to write (default plan.json)")
    pl.add_argument("--dtype", default=None)
    pl.add_argument("--calib", default="wiki")
    pl.add_argument("--calib-windows", type=int, default=128)
    pl.add_argument("--calib-window", type=int, default=512)
    pl.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    _add_budget_args(pl)
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the original")
    e.add_argument("target", help="ampq checkpoint folder or any model")
    e.add_argument("--reference", help="the original model (default: the checkpoint's source)")
    _add_eval_args(e)
    e.set_defaults(func=cmd_eval)

    i = sub.add_parser("inspect", help="list a checkpoint's layers, formats and bytes (verifies every hash)")
    i.add_argument("directory")
    i.set_defaults(func=cmd_inspect)

    b = sub.add_parser("bench", help="throughput, latency, bandwidth and memory of a model or checkpoint")
    b.add_argument("model")
    b.add_argument("--batch", default="1,4,16", help="batch sizes (default 1,4,16)")
    b.add_argument("--prompt-tokens", type=int, default=128)
    b.add_argument("--new-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--dtype", default=None, help="unquantized weights' dtype (default float32)")
    b.add_argument("--device", default="cpu")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--json", dest="json_out", default=None, help="write the results as JSON")
    b.add_argument("--plot", default=None, help="write a PNG of throughput and latency against batch size")
    b.set_defaults(func=cmd_bench)
    v = sub.add_parser("verify", help="check a checkpoint's files, hashes and layer table without loading the model")
    v.add_argument("directory")
    v.set_defaults(func=cmd_verify)
    r = sub.add_parser("report", help="figures of a checkpoint: allocation heatmap, sensitivity, Pareto curve")
    r.add_argument("directory")
    r.add_argument("-o", "--output", default=None, help="folder for the PNGs (default: DIRECTORY-report)")
    r.add_argument("--sensitivity", default=None, help="sensitivity table (default: the one the checkpoint carries)")
    r.add_argument("--pareto", default=None, help="benchmarks/results/pareto.json, for the Pareto curve")
    r.add_argument("--model-name", default=None, help="which model's rows of --pareto to draw (default: the checkpoint's source)")
    r.set_defaults(func=cmd_report)
    f = sub.add_parser("formats", help="list the number formats")
    f.set_defaults(func=cmd_formats)

    s = sub.add_parser("schemes", help="list the quantization schemes")
    s.set_defaults(func=cmd_schemes)

    x = sub.add_parser("export", help="write a checkpoint another engine loads "
                       "(compressed-tensors: vLLM; gguf: llama.cpp)")
    x.add_argument("directory", help="ampq checkpoint folder")
    x.add_argument("--to", required=True, choices=["compressed-tensors", "gguf"], help="the format to write")
    x.add_argument("out", help="output folder (compressed-tensors) or .gguf file (gguf)")
    x.add_argument("--nearest", action="store_true", help="re-quantize layers whose format has no exact "
                   "counterpart to the nearest one that has, and report how far the weights moved")
    x.add_argument("--overwrite", action="store_true", help="replace an existing output folder or file")
    x.set_defaults(func=cmd_export)

    g = sub.add_parser("generate", help="greedy text generation from a model or checkpoint")
    g.add_argument("model")
    g.add_argument("--prompt", default="The capital of France is")
    g.add_argument("--max-new-tokens", type=int, default=40)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("--adapt-memory", default=None, help="adaptive checkpoints: keep the whole model under this size "
                   "(e.g. 60MB) and within free memory, switching layers between steps")
    g.add_argument("--adapt-budget", type=float, default=None,
                   help="adaptive checkpoints: switch to this many bits per weight before generating")
    g.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries()
        return args.func(args)
    except AmpqError as e:
        print(f"ampq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ampq: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
