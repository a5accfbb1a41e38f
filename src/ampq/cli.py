"""The `ampq` command line: quantize, plan, eval, inspect, report, formats, schemes, generate."""

from __future__ import annotations

import argparse
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
    p.add_argument("--window", type=int, default=None, help="tokens per evaluation window (default 512; for an "
                   "encoder, the most tokens of each text, default 128)")
    p.add_argument("--stride", type=int, default=None, help="tokens between window starts (default: the window)")
    p.add_argument("--windows", type=int, default=None, help="number of windows per text (default 32; for an "
                   "encoder, the number of texts cut from each, default 256)")
    p.add_argument("--json", dest="json_out", help="also write the results to this JSON file")


def _texts(args, model) -> list:
    """The texts to evaluate on, cut as suits the model: windows for a language model, pieces for an encoder."""
    from ampq.comparison import evaluation_defaults
    from ampq.data import Text

    cut = evaluation_defaults(model)
    windows, window = args.windows or cut["windows"], args.window or cut["window"]
    return [Text(c.strip(), windows, window, args.stride) for c in args.corpus.split(",") if c.strip()]


def _results_json(results, label: str) -> list[dict]:
    """Each text's figures as the JSON reports have them: the model's, the original's, any compared."""
    return [{"corpus": r.text, "model": r.models[label].as_dict(),
             "reference": r.reference.as_dict() if r.reference is not None else None,
             **({"compared": {k: q.as_dict() for k, q in r.models.items() if k != label}} if len(r.models) > 1 else {})}
            for r in results]


def _spec(args):
    """What `quantize` and `plan` were asked for, a Plan, a Budget or a Scheme, and how to label it."""
    import dataclasses

    from ampq import Budget, Plan
    from ampq.nested import parse_levels
    from ampq.pipeline.run import label
    from ampq.schemes import get_scheme

    fmt, scheme, adaptive = (getattr(args, k, None) for k in ("format", "scheme", "adaptive"))
    plan = getattr(args, "plan", None)
    if args.budget is not None or args.max_size is not None or plan is not None:
        if fmt:
            raise AmpqError("--format picks one format for every layer; drop it when giving --budget, --max-size or --plan")
        if scheme:
            raise AmpqError("--scheme picks one method for every layer, a budget or a plan one per layer; drop "
                            "--scheme (--candidates says which methods a budget weighs)")
        if plan is not None:
            return Plan.load(plan), f"plan-{Path(plan).stem}"
        budget = Budget(bits=args.budget, bytes=args.max_size, candidates=args.candidates, estimator=args.estimator,
                        tied=not args.untied, sensitivity=args.sensitivity, transform=args.transform, target=args.target,
                        embeddings=args.embeddings, head=args.lm_head if isinstance(args.lm_head, str) else None)
        return budget, budget.label
    levels = parse_levels(adaptive) if adaptive else None
    chosen = get_scheme(scheme or ("gptq" if levels else "rtn"))
    chosen = dataclasses.replace(chosen, format=fmt or (f"int{levels[0]}-g128" if levels else chosen.format),
                                 clip=chosen.clip or args.clip,
                                 bias_correction=chosen.bias_correction or args.bias_correction,
                                 options={**chosen.options, **({"act_order": False} if args.in_order else {})})
    return chosen, label(chosen, adaptive)


def cmd_quantize(args) -> int:
    import ampq
    from ampq.comparison import print_comparison, size_of, uniform_peers
    from ampq.models import copy_sharing_embeddings
    from ampq.data import Text
    from ampq.pipeline.run import check_output, summary

    if args.compare is not None and not args.eval:
        raise AmpqError("--compare scores other schemes beside the quantized model, which --eval does; add --eval")
    spec, label = _spec(args)
    if args.devices is not None and args.device is not None:
        raise AmpqError("--devices names every rank's device; drop --device")
    if args.eval and (args.devices is not None or "WORLD_SIZE" in os.environ):
        raise AmpqError("--eval runs in one process; drop it and score the result with `ampq eval OUTPUT`")
    if args.devices is not None and "WORLD_SIZE" not in os.environ:  # not yet a rank: start them
        from ampq.launch import launch

        launch([d for d in args.devices.split(",") if d.strip()], sys.argv[1:])
        return 0
    output = check_output(args.output or f"{Path(args.model).name.removesuffix('.gguf')}-{label.replace(' ', '-')}",
                          args.overwrite)
    if args.max_memory is not None and args.eval:
        raise AmpqError("--eval keeps the original model in memory beside the quantized one; drop --eval or "
                        f"--max-memory, and score the result afterwards with `ampq eval {output}`")
    calibration = Text(args.calib, args.calib_windows, args.calib_window)
    model, tok = ampq.load_model(args.model, args.dtype, lazy=args.max_memory is not None)
    original = copy_sharing_embeddings(model) if args.eval else None
    t0 = time.perf_counter()
    ampq.quantize(model, spec, calibration=calibration, tokenizer=tok, adaptive=args.adaptive, lm_head=args.lm_head,
                  compute_dtype=args.compute_dtype, output=output, overwrite=args.overwrite, memory=args.max_memory,
                  device=args.device, devices=args.devices, max_gpu_memory=args.max_gpu_memory,
                  embeddings=args.embeddings)
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # the main rank reports
    print(summary(model, args.model, label, seconds, output))
    if args.eval:
        compared = uniform_peers(model, original, spec, args.compare, calibration=calibration, tokenizer=tok,
                                 lm_head=args.lm_head, compute_dtype=args.compute_dtype)
        models = {label: model, **compared}
        results = ampq.evaluate(models, original, text=_texts(args, model), tokenizer=tok)
        title = f"{args.model}: {label} against the original" + (
            f" and {', '.join(compared)}, uniform schemes of about its size" if compared else "")
        print_comparison(title, results, {"original": size_of(original), **{k: size_of(m) for k, m in models.items()}})
        if args.json_out:
            bits, nbytes = size_of(model)
            _write_json(args.json_out, {"model": args.model, "format": getattr(spec, "format", None),
                                        "scheme": getattr(spec, "name", label), "seconds": seconds,
                                        "bits_per_weight": bits, "model_bytes": nbytes,
                                        "original_bytes": size_of(original)[1],
                                        "results": _results_json(results, label)})
    return 0


def cmd_plan(args) -> int:
    import ampq
    from ampq.data import Text, sized_for
    from ampq.report import print_table

    budget, _ = _spec(args)
    model, tok = ampq.load_model(args.model, args.dtype)
    calibration = sized_for(Text(args.calib, args.calib_windows, args.calib_window), model)
    print(f"calibration: {calibration.describe()}", file=sys.stderr)
    plan = ampq.plan(model, budget, calibration=calibration, tokenizer=tok)
    out = plan.save(args.output)
    rows = [[name, p.format, p.algorithm + ("+clip" if p.clip else ""), p.bytes, p.damage] for name, p in plan.layers.items()]
    print_table(f"plan for {args.model} ({plan.budget})", ["layer", "format", "algorithm", "bytes", "est. damage"], rows,
                f"{plan.total_bytes:,} bytes of linears"
                + "".join(f"; {what} in {fmt}" for what, fmt in (("embedding table", plan.embeddings),
                                                                 ("head", plan.head)) if fmt)
                + f"; written to {out}; quantize with: ampq quantize {args.model} --plan {out}")
    return 0


def cmd_eval(args) -> int:
    import ampq
    from ampq.comparison import print_comparison, size_of

    model, tok = ampq.load_model(args.target, keep_quantized=True)
    ref_spec = args.reference or getattr(model.config, "ampq_source", None)
    reference = None
    if ref_spec and ref_spec != args.target:
        reference, ref_tok = ampq.load_model(ref_spec)
        tok = tok or ref_tok  # a checkpoint saved without its tokenizer reads text as its source does
    elif args.reference is None and ref_spec is None:
        print("no --reference given and the checkpoint names no source: reporting perplexity only", file=sys.stderr)
    label = str(args.target)
    results = ampq.evaluate({label: model}, reference, text=_texts(args, model), tokenizer=tok)
    sizes = {f"original ({ref_spec})": size_of(reference)} if reference is not None else {}
    print_comparison(f"evaluation of {args.target}", results, {**sizes, label: size_of(model)},
                     reference=f"original ({ref_spec})")
    if args.json_out:
        _write_json(args.json_out, {"target": args.target, "reference": ref_spec,
                                    "results": _results_json(results, label)})
    return 0


def cmd_inspect(args) -> int:
    from ampq.io.checkpoint import verify_checkpoint
    from ampq.report import print_table

    manifest = verify_checkpoint(args.directory)
    layers = manifest.get("layers", {})
    rows = [[name, "+".join([e["format"]] + [r["format"] for r in (e.get("nested") or {}).get("residuals", [])]),
             e["algorithm"], ("{} x ".format(e["experts"]) if "experts" in e else "") + "x".join(map(str, e["shape"])),
             e["bytes"], e["bits_per_weight"]]
            for name, e in layers.items()]
    total_files = sum(f["bytes"] for n, f in manifest["files"].items() if n.endswith(".safetensors"))
    q_bytes = sum(e["bytes"] for e in layers.values())
    q_weights = sum(e.get("experts", 1) * e["shape"][0] * e["shape"][1] for e in layers.values())
    rows.append(["all quantized layers", "", "", f"{q_weights:,} weights", q_bytes,
                 8 * q_bytes / q_weights if q_weights else None])
    print_table(f"{args.directory} (ampq {manifest.get('ampq_version')}, source {manifest.get('source')})",
                ["layer", "format", "algorithm", "shape", "bytes", "bits/weight"], rows,
                f"{len(manifest['tensors'])} tensors, {total_files:,} bytes of safetensors; every hash verified")
    covered = manifest.get("coverage")
    if isinstance(covered, dict) and isinstance(covered.get("line"), str):
        print(covered["line"])
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
                       repeats=args.repeats, baseline_rss=baseline, compiled=args.compile)
    bits = linear_bits(model)
    table = [[r.batch, r.prefill_tokens_per_s, r.decode_tokens_per_s, r.latency_p50_ms, r.latency_p99_ms,
              r.bandwidth_gb_s, r.predicted_bytes / 1e6, r.measured_bytes / 1e6 if r.measured_bytes else None]
             for r in rows]
    print_table(f"{args.model}: {bits:.2f} bits per weight over the block linears, {torch.get_num_threads()} threads",
                ["batch", "prefill tok/s", "decode tok/s", "p50 ms", "p99 ms", "weights GB/s", "predicted MB",
                 "measured MB"], table,
                f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, medians of {args.repeats} runs after a "
                "warm-up; weights GB/s = bytes of weights read per decoding step / step time; predicted = weights + "
                "KV cache; measured = resident memory at the end of decoding minus before loading (CPU) or peak allocated (GPU)"
                + ("; decoding compiled (ampq.compile), capture took "
                   + ", ".join(f"{r.compile_seconds:.1f} s" for r in rows) if args.compile else ""))
    result = {"model": args.model, "bits_per_weight": bits, "device": args.device, "threads": torch.get_num_threads(),
              "dtype": str(next(model.parameters()).dtype), "compiled": args.compile, "rows": [r.as_dict() for r in rows]}
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
    import ampq

    summary = ampq.export(args.directory, args.out, to=args.to, nearest=args.nearest, overwrite=args.overwrite)
    print(summary["line"])
    for warning in summary["warnings"]:
        print(f"ampq: warning: {warning}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    import torch

    import ampq

    from ampq.models import is_encoder

    model, tok = ampq.load_model(args.model, keep_quantized=True)
    if is_encoder(model):
        raise AmpqError(f"{args.model} is an encoder ({type(model).__name__}): it makes embeddings, not text; "
                        f"score it with `ampq eval {args.model}`")
    if tok is None:
        raise AmpqError(f"{args.model} has no tokenizer to read the prompt with; re-save it with its tokenizer")
    messages = [{"role": "user", "content": args.prompt}]
    if args.chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    decoder = ampq.compile(model, max_len=ids.shape[1] + args.max_new_tokens) if args.compile else None
    if args.adapt_memory or args.adapt_budget is not None:
        return _generate_adaptive(model, tok, ids, args, decoder)
    if decoder is not None:
        new = decoder.generate(ids, args.max_new_tokens, tok.eos_token_id)[0]
        print(f"compiled the decoding step in {decoder.capture_seconds[0]:.1f} s", file=sys.stderr)
    else:
        with torch.inference_mode():
            new = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)[0, ids.shape[1]:]
    print(tok.decode(new, skip_special_tokens=True))
    return 0


def _generate_adaptive(model, tok, ids, args, decoder=None) -> int:
    """Greedy decoding one token at a time, the memory policy consulted before every step; with a
    compiled ``decoder``, each switch is followed by a new capture of the step, and its time told."""
    import torch

    from ampq.pipeline.adaptive import MemoryTarget, adapt, stored_range
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
            if decoder is not None:
                captures = len(decoder.capture_seconds)
                logits = decoder.prefill(step_ids) if step == 0 else decoder.step(step_ids)
                if step and len(decoder.capture_seconds) > captures:
                    print(f"step {step}: captured the compiled step again in {decoder.capture_seconds[-1]:.1f} s",
                          file=sys.stderr)
            else:
                out = model(input_ids=step_ids, use_cache=True, **past)
                # transformers 5 calls the KV cache `cache`; earlier versions `past_key_values`
                past = {"cache": out.cache} if getattr(out, "cache", None) is not None else {
                    "past_key_values": out.past_key_values}
                logits = out.logits
            token = logits.reshape(logits.shape[0], -1, logits.shape[-1])[:, -1].argmax(-1, keepdim=True)
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
                   "candidates (default: 3- to 6-bit integer layouts with a minimum and with an exact zero, NF4, int8, bf16; `python -c \"import ampq.sensitivity as s; print(s.DEFAULT_CANDIDATES)\"` lists them)")
    p.add_argument("--sensitivity", default=None, help="AMPQ: sensitivity table to reuse or write "
                   "(default: cached per model, candidates and calibration)")
    p.add_argument("--estimator", default="fisher", choices=["fisher", "hessian"],
                   help="AMPQ: sensitivity estimate: Fisher-weighted output error in nats of KL (default), or the "
                   "plain Hessian output error (no backward passes)")
    p.add_argument("--untied", action="store_true", help="AMPQ: let q/k/v and gate/up take different formats")
    p.add_argument("--target", default="any", choices=["any", "vllm", "llama.cpp", "transformers"],
                   help="AMPQ: the engine that will serve the model; its candidates are the formats that engine runs as "
                   "stored, so `ampq export` changes no layer (vllm: --to compressed-tensors; llama.cpp: --to gguf; "
                   "default any: every format, for ampq and transformers)")
    p.add_argument("--transform", default="none", choices=["none", "awq", "auto"],
                   help="AMPQ: rescale the float model before measuring sensitivity (awq: AWQ's per-channel scales, "
                   "folded into the op before each group), so every candidate is measured on the weights it will "
                   "quantize; auto: measure without and with it, keep the plan of least estimated damage; default none)")
    p.add_argument("--embeddings", default=None, metavar="FORMAT",
                   help="store the token embedding table in FORMAT (e.g. q6_k, int8-g32-sym, int4-g32), as llama.cpp's "
                   "default files do; a tied head reads the same table, and --max-size leaves the bytes saved to the "
                   "linears (GGUF export only; default: kept in 16/32 bits)")
    p.add_argument("--lm-head", nargs="?", const=True, default=False, metavar="FORMAT",
                   help="quantize the output head too (round to nearest): in FORMAT (e.g. int8-g32-sym, as llama.cpp's "
                   "Q8_0), or without one in the --format given; --max-size leaves the bytes saved to the linears")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ampq", description="Quantize transformer language models and run them.")
    sub = parser.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="built-in name (smollm2-135m, qwen2.5-coder-0.5b), HF folder, .gguf file or hub id")
    q.add_argument("-s", "--scheme", default=None, help="technique: rtn (default; gptq with --adaptive), gptq, awq, eetq, llm-int8, "
                   "bnb-nf4, bnb-fp4, fp8, fp8-w8a8 ... (see `ampq schemes`; TGI's --quantize names work too)")
    q.add_argument("-f", "--format", default=None, help="number format (default: the scheme's, int4-g128 for rtn; see `ampq formats`)")
    q.add_argument("--calib", default="mix", help="calibration text: built-in corpus, a mix (default mix: wiki, code, technical and multilingual text, first halves) or a file")
    q.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (default: tokens for twice the widest linear's inputs, an expert's counted per routed token, at least 32)")
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
    q.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    q.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="keep resident memory under SIZE (e.g. 2GB): weights are read from the safetensors one "
                        "block at a time, calibration activations that do not fit go to disk beside the output")
    q.add_argument("--device", default=None, help="where to quantize: auto (a GPU when there is one), cpu, cuda, cuda:N "
                   "(default: cpu); every stage runs there one decoder block at a time, the weights stay on the CPU")
    q.add_argument("--devices", default=None, metavar="LIST",
                   help="several devices, one rank each through torch.distributed (e.g. 0,1 for two GPUs; cpu,cpu for two "
                        "CPU ranks): starts the ranks itself; under torchrun each rank takes its entry. The output does "
                        "not depend on how many")
    q.add_argument("--max-gpu-memory", default=None, metavar="SIZE",
                   help="cap the device memory the run uses (e.g. 40GB), as --max-memory caps the CPU's")
    q.add_argument("--eval", action="store_true", help="evaluate against the original and print the table")
    q.add_argument("--compare", default=None, metavar="SCHEMES",
                   help="with --eval: also quantize the original with these schemes (comma-separated, e.g. gptq,awq; "
                        "none for no comparison) and score them in the same table (default with --budget/--max-size: "
                        "the candidate whose uniform size is nearest the budget, e.g. int4-g128:gptq at 4.25)")
    _add_eval_args(q)
    q.set_defaults(func=cmd_quantize)

    pl = sub.add_parser("plan", help="measure sensitivity and allocate formats under a budget, without quantizing")
    pl.add_argument("model")
    pl.add_argument("-o", "--output", default="plan.json", help="plan file to write (default plan.json)")
    pl.add_argument("--dtype", default=None)
    pl.add_argument("--calib", default="mix")
    pl.add_argument("--calib-windows", type=int, default=None,
                    help="calibration windows (default: tokens for twice the widest linear's inputs, an expert's counted per routed token, at least 32)")
    pl.add_argument("--calib-window", type=int, default=512)
    pl.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    _add_budget_args(pl)
    pl.set_defaults(func=cmd_plan)

    e = sub.add_parser("eval", help="perplexity, KL and top-1 agreement against the original (an encoder: "
                       "cosine similarity of its embeddings and nearest-neighbour agreement)")
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
    b.add_argument("--compile", action="store_true", help="decode with a static KV cache and the step compiled "
                   "(ampq.compile); the capture is timed apart")
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
    g.add_argument("--compile", action="store_true", help="decode with a static KV cache and the step compiled "
                   "(ampq.compile): the first token waits for the compilation, the others run faster")
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
