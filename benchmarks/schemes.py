"""Every scheme on the built-in models, with the same calibration and evaluation text for all.

    python benchmarks/schemes.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--calib-windows 128]
    python benchmarks/schemes.py --ablation            # RTN / +clip / +bias / GPTQ / GPTQ+clip+bias

Each (model, scheme) runs in its own process so that its peak memory is its own. Perplexity on the
held-out halves of wiki and c4, KL and top-1 agreement against the unquantized model, bits per
weight of the quantized linears, model bytes, quantization time (calibration included) and peak
resident memory. Rows of peer libraries (benchmarks/peers/) are merged into the table with --peers.
Writes benchmarks/results/schemes/schemes.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

SCHEMES = ["rtn", "gptq", "gptq-in-order", "awq", "gptq-ecb", "eetq", "llm-int8", "bnb-nf4", "bnb-nf4-dq",
           "bnb-fp4", "bnb-fp4-dq", "fp8", "fp8-e5m2", "fp8-w8a8"]
ABLATION = [("rtn", False, False), ("rtn", True, False), ("rtn", True, True), ("gptq", False, False),
            ("gptq", True, True)]


def one(args) -> dict:
    """Quantize one model with one scheme and evaluate it (runs in a child process)."""
    import torch

    import ampq
    from ampq.data import make_windows
    from ampq.evaluation import Reference, evaluate
    from ampq.report import linear_bits, model_bytes
    from ampq.schemes import get_scheme

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    scheme = get_scheme(args.scheme)
    kwargs = scheme.quantize_kwargs()
    if args.clip is not None:
        kwargs["clip"], kwargs["bias_correction"] = args.clip, args.bias
    fmt = args.format or scheme.format
    if args.one_pass:
        kwargs["sequential"] = False
    model, tok = ampq.load_model(args.model)
    calib = None
    t0 = time.perf_counter()
    if scheme.needs_calibration or kwargs["clip"] or kwargs["bias_correction"]:
        calib = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)
    ampq.quantize(model, fmt, calibration=calib, progress=False, **kwargs)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    original, _ = ampq.load_model(args.model)
    label = scheme.name if args.clip is None else "+".join(
        [scheme.algorithm] + (["clip"] if args.clip else []) + (["bias"] if args.bias else []))
    label += " (one pass)" if args.one_pass else ""
    row = {"library": "ampq", "model": args.model, "scheme": label, "format": fmt,
           "bits_per_weight": linear_bits(model), "model_bytes": model_bytes(model),
           "quantize_s": seconds, "peak_rss_bytes": peak, "calib_windows": args.calib_windows if calib is not None else None,
           "calib_window": args.calib_window, "eval_windows": args.windows, "threads": torch.get_num_threads()}
    for corpus in args.corpora.split(","):
        windows = make_windows(tok, corpus, "eval", 512, args.windows)
        ref = Reference(original, windows)
        q = evaluate(model, windows, ref, progress=False)
        row[corpus] = q.as_dict()
        row[f"{corpus}_original"] = ref.quality.as_dict()
    return row


PEER_LIBRARIES = {"llmc": "llm-compressor", "bnb": "bitsandbytes", "hqq": "hqq", "quanto": "optimum-quanto"}


def peer_row(r: dict) -> dict:
    """A row written by benchmarks/peers/run_peer.py in this table's shape."""
    peer, cfg = r["peer"], r.get("config") or {}
    if peer == "quanto":
        sizes = sorted(int(k) for k in (cfg.get("group_sizes") or {}) if k != "None")
        fmt = cfg.get("weights", "?") + (f"-g{'/'.join(map(str, sizes))}" if sizes else "-ch")
        peer = f"quanto-{cfg.get('weights', '?')}"
    elif peer in ("bnb-nf4", "bnb-fp4"):
        fmt = f"{peer[4:]}-b{r['group']}" + ("-dq" if cfg.get("compress_statistics") else "")
    elif peer == "bnb-int8":
        fmt = "int8-ch-sym + outliers"
    else:
        fmt = f"int{r['bits']}-g{r['group']}" if r.get("group") else f"int{r['bits']}-ch"
    row = {"library": PEER_LIBRARIES.get(r["peer"].split("-")[0], r["peer"]), "model": r["model"],
           "scheme": peer, "format": fmt,
           "bits_per_weight": r["bits_per_weight"], "model_bytes": r.get("model_bytes"),
           "quantize_s": r["quantize_s"], "peak_rss_bytes": r["peak_rss_bytes"],
           "calib_windows": (r.get("calib") or {}).get("windows"), "eval_windows": r["eval"]["windows"],
           "ablation": False}
    for corpus, quality in r["quality"].items():
        row[corpus] = quality
        row[f"{corpus}_original"] = r["original"][corpus]
    return row


def markdown(rows: list[dict], info: dict, corpora: list[str]) -> str:
    lines = [f"Measured on {describe(info)}.", ""]
    head = ["model", "library", "scheme", "format", "bits/weight", "model MB"] + [f"ppl {c}" for c in corpora] + \
           ["KL", "top-1", "quantize s", "peak RSS GB", "calib windows"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    seen_orig = set()
    for r in rows:
        if r["model"] not in seen_orig:
            seen_orig.add(r["model"])
            o = [r[f"{c}_original"]["perplexity"] for c in corpora]
            lines.append(f"| {r['model']} | - | original | fp32 | 32 | - | " + " | ".join(f"{v:.3f}" for v in o)
                         + f" | 0 | 1 | - | - | eval {r.get('eval_windows', '?')} x 512 |")
        kl = sum(r[c]["kl"] for c in corpora) / len(corpora)
        top1 = sum(r[c]["top1"] for c in corpora) / len(corpora)
        cells = [r["model"], r["library"], r["scheme"], f"`{r['format']}`", f"{r['bits_per_weight']:.3f}",
                 f"{r['model_bytes'] / 1e6:.1f}" if r.get("model_bytes") else "-"]
        cells += [f"{r[c]['perplexity']:.3f}" for c in corpora]
        cells += [f"{kl:.4f}", f"{top1:.3f}", f"{r['quantize_s']:.0f}", f"{r['peak_rss_bytes'] / 2**30:.2f}",
                  str(r.get("calib_windows") or "-")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--schemes", default=",".join(SCHEMES))
    p.add_argument("--format", default=None, help="override every scheme's format")
    p.add_argument("--ablation", action="store_true", help="the clip / bias correction / GPTQ ablation instead")
    p.add_argument("--ablation-formats", default="int4-g128,int3-g128")
    p.add_argument("--calib", default="wiki")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--corpora", default="wiki,c4")
    p.add_argument("--windows", type=int, default=16, help="evaluation windows of 512 tokens per text")
    p.add_argument("--threads", type=int, default=None, help="torch threads per job (default: all cores)")
    p.add_argument("--one-pass", action="store_true", help="statistics of all linears of a block from one pass of "
                   "the float block (llm-compressor's way) instead of group after group")
    p.add_argument("--peers", nargs="*", default=[], help="JSON rows written by benchmarks/peers/run_peer.py")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "schemes" / "schemes.json"))
    p.add_argument("--merge", nargs="*", default=[], help="fold the rows of other results files of this script in")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--scheme", help=argparse.SUPPRESS)
    p.add_argument("--clip", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--bias", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        Path(args.row).write_text(json.dumps(one(args)))
        return

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    rows = [r for r in previous["rows"]]
    jobs = []
    for model in args.models.split(","):
        if args.ablation:
            for fmt in args.ablation_formats.split(","):
                for algo, clip, bias in ABLATION:
                    jobs.append((model, algo, fmt, int(clip), int(bias)))
        else:
            for scheme in [s for s in args.schemes.split(",") if s]:
                jobs.append((model, scheme, args.format, None, None))
    common = ["--calib", args.calib, "--calib-windows", str(args.calib_windows), "--calib-window",
              str(args.calib_window), "--corpora", args.corpora, "--windows", str(args.windows)]
    if args.threads:
        common += ["--threads", str(args.threads)]
    if args.one_pass:
        common += ["--one-pass"]
    for model, scheme, fmt, clip, bias in jobs:
        print(f"[{model}] {scheme} {fmt or ''} clip={clip} bias={bias}", file=sys.stderr, flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as tmp:
            cmd = [sys.executable, __file__, "--one", "--model", model, "--scheme", scheme, "--row", tmp.name, *common]
            if fmt:
                cmd += ["--format", fmt]
            if clip is not None:
                cmd += ["--clip", str(clip), "--bias", str(bias)]
            if subprocess.run(cmd).returncode != 0:
                print(f"[{model}] {scheme} failed; the table goes on without it", file=sys.stderr, flush=True)
                continue
            row = json.loads(Path(tmp.name).read_text())
        row["ablation"] = args.ablation
        rows = [r for r in rows if not (r["model"] == row["model"] and r["scheme"] == row["scheme"]
                                        and r["format"] == row["format"] and r["library"] == "ampq")]
        rows.append(row)
        _write(out, rows, args.corpora.split(","))
    for other in args.merge:
        for row in json.loads(Path(other).read_text())["rows"]:
            rows = [r for r in rows if _key(r) != _key(row)] + [row]
    for peer in args.peers:
        row = peer_row(json.loads(Path(peer).read_text()))
        rows = [r for r in rows if not (r["model"] == row["model"] and r["scheme"] == row["scheme"]
                                        and r["library"] == row["library"] and r["format"] == row["format"])]
        rows.append(row)
    _write(out, rows, args.corpora.split(","))


def _key(r: dict) -> tuple:
    return r["model"], r["library"], r["scheme"], r["format"]


def _write(out: Path, rows: list[dict], corpora: list[str]) -> None:
    info = machine()
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.exists():  # another run may have added rows meanwhile: keep them
        mine = {_key(r) for r in rows}
        rows = [r for r in json.loads(out.read_text())["rows"] if _key(r) not in mine] + rows
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps({"machine": info, "rows": rows}, indent=2))
    os.replace(tmp, out)
    rows = sorted(rows, key=lambda r: (r["model"], r.get("ablation", False), r["format"], r["library"], r["scheme"]))
    out.with_suffix(".md").write_text(markdown(rows, info, corpora))


if __name__ == "__main__":
    main()
