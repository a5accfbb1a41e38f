"""Wall time and peak resident memory of an evaluation against the original model, before and
after the streaming evaluation, on the same windows, each variant in its own process.

    python benchmarks/eval_speed.py [--model smollm2-135m] [--formats int4-g128,nf4-b64]
                                    [--corpus wiki] [--windows 32] [--window 512]
                                    [--variants before,per-call,after] [--repeats 1]

The model is quantized once (round to nearest) and saved; every variant then loads that checkpoint
and the original, as `ampq eval` does, and evaluates the checkpoint against the original:
``before``: ampq.evaluate as of commit BEFORE_COMMIT (read with `git show`: reference
log-probabilities kept for every window, each quantized weight decoded on every call);
``per-call``: the streaming evaluation decoding on every call (``decode_once=False``);
``after``: the streaming evaluation, each weight decoded once. Peak memory is the child's
``ru_maxrss``, also given beside its resident memory just before the evaluation. Variants run one
after the other (in turn when repeated): compare ratios within one run, since other jobs on the
machine slow every variant. Writes benchmarks/results/eval_speed/eval_speed.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from _machine import describe, machine  # noqa: E402
BEFORE_COMMIT = "a2d31c4"  # the last commit with the evaluation that kept every reference log-probability
OUT = ROOT / "benchmarks" / "results" / "eval_speed" / "eval_speed.json"
VARIANTS = ("before", "per-call", "after")


def _resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _old_evaluate_module():
    source = subprocess.run(["git", "-C", str(ROOT), "show", f"{BEFORE_COMMIT}:src/ampq/evaluate.py"],
                            check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "ampq_evaluate_before.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("ampq_evaluate_before", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def child(variant: str, checkpoint: str, args) -> dict:
    """One evaluation in this process: the figures, seconds and memory as JSON on stdout."""
    import ampq
    from ampq import evaluate as new
    from ampq.data import make_windows

    module = _old_evaluate_module() if variant == "before" else new
    kwargs = {"decode_once": False} if variant == "per-call" else {}
    model, tok = ampq.load_model(checkpoint, keep_quantized=True)
    original, _ = ampq.load_model(args.model)
    windows = make_windows(tok, args.corpus, "eval", args.window, args.windows)
    rss_before = _resident()
    t0, c0 = time.perf_counter(), time.process_time()
    reference = module.Reference(original, windows)
    q = module.evaluate(model, windows, reference, progress=False, **kwargs)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"variant": variant, "seconds": seconds, "cpu_seconds": cpu, "peak_rss_bytes": peak,
            "rss_before_eval_bytes": rss_before, "perplexity": q.perplexity, "kl": q.kl, "top1": q.top1,
            "reference_perplexity": reference.quality.perplexity, "tokens": q.tokens}


def _quantized(fmt: str, args, directory: Path) -> Path:
    import ampq

    out = directory / fmt
    model, tok = ampq.load_model(args.model)
    ampq.quantize(model, fmt, progress=False)
    ampq.save(model, out, tok)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--formats", default="int4-g128,nf4-b64")
    p.add_argument("--corpus", default="wiki")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--variants", default="before,per-call,after")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "CHECKPOINT"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args)))
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        sys.exit(f"unknown variant {sorted(unknown)[0]!r}: choose from {', '.join(VARIANTS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in [f.strip() for f in args.formats.split(",") if f.strip()]:
            checkpoint = _quantized(fmt, args, Path(tmp))
            for repeat in range(args.repeats):
                for variant in variants:
                    cmd = [sys.executable, __file__, "--child", variant, str(checkpoint), "--model", args.model,
                           "--corpus", args.corpus, "--windows", str(args.windows), "--window", str(args.window)]
                    done = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                          env=dict(os.environ, HF_HUB_OFFLINE="1"))
                    row = {"format": fmt, "repeat": repeat, **json.loads(done.stdout.strip().splitlines()[-1])}
                    rows.append(row)
                    print(f"{fmt:12} {variant:9} {row['seconds']:7.1f} s (cpu {row['cpu_seconds']:6.1f} s)  "
                          f"peak {row['peak_rss_bytes'] / 2**30:5.2f} GiB (before eval "
                          f"{row['rss_before_eval_bytes'] / 2**30:4.2f})  ppl {row['perplexity']:.6g} "
                          f"kl {row['kl']:.6g} top-1 {row['top1']:.6g}", flush=True)
                    _write(args, rows, complete=False)  # what finished survives an interrupted run
    _write(args, rows, complete=True)
    return 0


def _write(args, rows: list[dict], complete: bool) -> None:
    m = machine()
    result = {"machine": m, "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
              "model": args.model, "corpus": args.corpus, "windows": args.windows, "window": args.window,
              "before_commit": BEFORE_COMMIT, "complete": complete, "load_average": os.getloadavg(), "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".json.tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    os.replace(tmp_out, out)
    if complete:
        print(f"{describe(m)}; written to {out}")


if __name__ == "__main__":
    sys.exit(main())
