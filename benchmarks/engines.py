"""ampq checkpoints in other engines: the same plan scored by ampq, by llama.cpp on the GGUF export,
and by transformers + compressed-tensors on the vLLM (compressed-tensors) export.

    python benchmarks/engines.py [--models smollm2-135m] [--windows 16] [--plans all]

Per model and plan: the ampq checkpoint (made with `ampq quantize`, kept in --work), its perplexity
with ampq's reference kernel on the held-out half of wiki (--windows windows of 512 tokens);
`ampq export --to gguf` (exact where GGUF holds the format, else --nearest, said in the row) and
llama.cpp's perplexity on the same token windows (llama-cpp-python, all logits of each window,
n_ctx 512, CPU); `ampq export --to compressed-tensors` (likewise) loaded back by transformers,
which decompresses it with the compressed-tensors library, and by ampq's importer. Criterion
(issue 7): llama.cpp within 1% of ampq's perplexity where the export is exact.

`--plans all` adds AMPQ plans made for one engine (`--target vllm` / `--target llama.cpp` at 4.25 and
5.0 bits): each goes to its engine only, without --nearest (the export must change no layer), and
the compressed-tensors export's logits in transformers are compared with ampq's on the first window
(largest absolute difference).

llama.cpp's CPU matmuls quantize activations to 8 bits (Q8_0/Q8_1 blocks) for its quantized
weight types; ampq's reference kernel does not: that, not the weights, is the gap measured.
Writes benchmarks/results/engines/engines.json and .md. Needs llama-cpp-python (a benchmark extra; it
compiles llama.cpp, about 15 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _llama import load_llama  # noqa: E402
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq import atomic  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import evaluate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "engines"
# name -> `ampq quantize` arguments. Symmetric int4 and int8 plans are exact in both engines;
# int4-g32 (asymmetric, min + scale * q) is GGUF's Q4_1 and needs --nearest for compressed-tensors;
# int4-g64-zp (integer zero points) is compressed-tensors' and GPTQ's, and --nearest for GGUF.
PLANS = {
    "int4-g32 rtn": ["-f", "int4-g32"],
    "int4-g64-sym rtn": ["-f", "int4-g64-sym"],
    "int4-g64-sym gptq": ["-s", "gptq", "-f", "int4-g64-sym"],
    "int4-g64-zp gptq": ["-s", "gptq", "-f", "int4-g64-zp"],
    "ampq 5.0 (int4-g64-sym gptq / int8-ch-sym)": ["--budget", "5.0", "--candidates", "int4-g64-sym:gptq,int8-ch-sym:rtn"],
    # plans made for one engine (its candidates only) go to that engine alone: the other export is refused
    "ampq --target vllm 4.25": ["--budget", "4.25", "--target", "vllm"],
    "ampq --target vllm 5.0": ["--budget", "5.0", "--target", "vllm"],
    "ampq --target llama.cpp 4.25": ["--budget", "4.25", "--target", "llama.cpp"],
    "ampq --target llama.cpp 5.0": ["--budget", "5.0", "--target", "llama.cpp"],
}
DEFAULT_PLANS = [p for p in PLANS if "--target" not in p]


def target_of(plan: str) -> str | None:
    args = PLANS[plan]
    return args[args.index("--target") + 1] if "--target" in args else None


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    return (done.stdout + done.stderr).strip().splitlines()[-1]


def checkpoint(model: str, plan: str, work: Path, calib_windows: int) -> Path:
    out = work / f"{model}-{plan.split(' (')[0].replace('--', '').replace(' ', '-')}"
    if not (out / "ampq.json").exists():
        args = PLANS[plan] + (["--calib-windows", str(calib_windows)] if "gptq" in plan or "--budget" in PLANS[plan] else [])
        print(f"  quantize: {run([sys.executable, '-m', 'ampq', 'quantize', model, *args, '-o', str(out)])}", flush=True)
    return out


def export(ckpt: Path, to: str, out: Path, exact_only: bool = False) -> dict:
    for nearest in (False,) if exact_only else (False, True):
        cmd = [sys.executable, "-m", "ampq", "export", str(ckpt), "--to", to, str(out), "--overwrite"]
        done = subprocess.run(cmd + (["--nearest"] if nearest else []), capture_output=True, text=True)
        if done.returncode == 0:
            lines = [l for l in (done.stdout + done.stderr).strip().splitlines() if not l.startswith("ampq: warning")]
            return {"nearest": nearest, "line": lines[-1] if lines else ""}
    raise RuntimeError(f"export to {to} failed:\n{done.stderr[-2000:]}")


def llama_cpp_perplexity(gguf: Path, windows) -> tuple[float, float]:
    import numpy as np

    llm = load_llama(gguf, n_ctx=windows.window, n_batch=windows.window, logits_all=True,
                n_threads=torch.get_num_threads(), verbose=False)
    nll, count, start = 0.0, 0, time.perf_counter()
    for ids in windows.tokens.tolist():
        llm.reset()
        llm.eval(ids)
        logits = torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32))
        lp = torch.log_softmax(logits, -1)
        nll -= lp[:-1].gather(-1, torch.tensor(ids[1:])[:, None]).sum().item()
        count += len(ids) - 1
    seconds = time.perf_counter() - start
    del llm
    return math.exp(nll / count), seconds


def transformers_perplexity(folder: Path, windows, ampq_logits: torch.Tensor) -> tuple[float, float]:
    """Perplexity of the export as transformers loads it (compressed-tensors decompresses it), and the
    largest difference of its logits from ampq's on the first window."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ppl = evaluate(model, windows, progress=False).perplexity
    with torch.no_grad():
        diff = (model(windows.tokens[:1]).logits.float() - ampq_logits).abs().max().item()
    del model
    gc.collect()
    return ppl, diff


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m")
    p.add_argument("--plans", default="default", help=f"semicolon-separated from: {'; '.join(PLANS)}; default: the "
                   "plans without --target; all: every plan")
    p.add_argument("--windows", type=int, default=16)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--work", type=Path, default=Path("/tmp/ampq-engines"))
    p.add_argument("--table", action="store_true", help="rewrite engines.md from engines.json and stop")
    args = p.parse_args()
    if args.table:
        write_table(json.loads((RESULTS / "engines.json").read_text()))
        return
    plans = {"all": list(PLANS), "default": DEFAULT_PLANS}.get(args.plans) or [s.strip() for s in args.plans.split(";")]
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for model_name in args.models.split(","):
        for plan in plans:
            print(f"{model_name} / {plan}", flush=True)
            ckpt = checkpoint(model_name, plan, args.work, args.calib_windows)
            model, tok = ampq.load_model(str(ckpt))
            windows = make_windows(tok, "wiki", "eval", 512, args.windows)
            from ampq.report import linear_bits

            row = {"model": model_name, "plan": plan, "bits_per_weight": round(linear_bits(model), 3),
                   "ampq_ppl": evaluate(model, windows, progress=False).perplexity, "date": machine()["date"]}
            first = windows.tokens[:1]
            with torch.no_grad():
                ampq_logits = model(first).logits.float()
            del model
            gc.collect()
            target = target_of(plan)
            row["gguf"] = row["llama_cpp_ppl"] = row["transformers_ct_ppl"] = row["ampq_import_ct_ppl"] = None
            if target in (None, "llama.cpp"):
                gguf = args.work / f"{ckpt.name}.gguf"
                row["gguf"] = export(ckpt, "gguf", gguf, exact_only=target is not None)
                row["llama_cpp_ppl"], row["llama_cpp_seconds"] = llama_cpp_perplexity(gguf, windows)
            if target in (None, "vllm"):
                ct = args.work / f"{ckpt.name}-ct"
                row["compressed_tensors"] = export(ckpt, "compressed-tensors", ct, exact_only=target is not None)
                groups = json.loads((ct / "config.json").read_text())["quantization_config"]["config_groups"]
                if all(g["weights"].get("symmetric", True) for g in groups.values()):
                    row["transformers_ct_ppl"], diff = transformers_perplexity(ct, windows, ampq_logits)
                    row["transformers_ct_max_logit_diff"] = diff
                else:  # transformers 5.24 + compressed-tensors 0.20 re-initialise packed zero points (README)
                    row["transformers_ct_ppl"] = None
                imported, _ = ampq.load_model(str(ct))
                row["ampq_import_ct_ppl"] = evaluate(imported, windows, progress=False).perplexity
                del imported
                gc.collect()
            for key in ("llama_cpp_ppl", "transformers_ct_ppl", "ampq_import_ct_ppl"):
                row[key.replace("_ppl", "_ratio")] = row[key] / row["ampq_ppl"] if row[key] else None
            print(json.dumps(row, indent=1), flush=True)
            rows.append(row)
    previous = RESULTS / "engines.json"  # rows of other models and plans are kept
    if previous.exists():
        keep = [r for r in json.loads(previous.read_text())["rows"]
                if (r["model"], r["plan"]) not in {(n["model"], n["plan"]) for n in rows}]
        rows = keep + rows
    result = {"machine": machine(), "windows": args.windows, "window": 512, "corpus": "wiki (held-out half)",
              "llama_cpp_python": _version("llama_cpp_python"), "compressed_tensors": _version("compressed-tensors"),
              "transformers": _version("transformers"), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic.write_text(RESULTS / "engines.json", json.dumps(result, indent=1))
    write_table(result)


def write_table(result: dict) -> None:
    rows = result["rows"]
    lines = [f"Machine: {describe(result['machine'])} (each row on the date it gives). wiki held-out half, "
             f"{result['windows']} windows of 512 tokens.", "",
             "| date | model | plan | bits/weight | ampq ppl | GGUF export | llama.cpp ppl (ratio) | compressed-tensors export "
             "| transformers ppl (ratio) | ampq import ppl (ratio) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        g = "not made (plan for vLLM)" if r["gguf"] is None else "nearest" if r["gguf"]["nearest"] else "exact"
        c = ("not made (plan for llama.cpp)" if r.get("compressed_tensors") is None
             else "nearest" if r["compressed_tensors"]["nearest"] else "exact")
        ct_ppl = (f"| {r['transformers_ct_ppl']:.3f} ({r['transformers_ct_ratio']:.4f}) " if r["transformers_ct_ppl"]
                  else "| not run (transformers expects unpacked zero points, compressed-tensors and vLLM write them packed) " if r.get("compressed_tensors")
                  else "| - ")
        lines.append(f"| {r['date']} | {r['model']} | {r['plan']} | {r['bits_per_weight']:.3f} | {r['ampq_ppl']:.3f} | {g} "
                     + (f"| {r['llama_cpp_ppl']:.3f} ({r['llama_cpp_ratio']:.4f}) " if r["llama_cpp_ppl"] else "| - ")
                     + f"| {c} " + ct_ppl
                     + (f"| {r['ampq_import_ct_ppl']:.3f} ({r['ampq_import_ct_ratio']:.4f}) |" if r["ampq_import_ct_ppl"]
                        else "| - |"))
    atomic.write_text(RESULTS / "engines.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
