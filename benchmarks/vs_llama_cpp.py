"""ampq's llama.cpp plans against llama.cpp's own quantizer, at equal file size, both scored by llama.cpp.

    python benchmarks/vs_llama_cpp.py [--models smollm2-135m,qwen2.5-coder-0.5b] [--types Q4_K_M,Q3_K_M,Q5_K_M,Q4_0]
                                      [--texts wiki,c4] [--windows 8] [--work /tmp/ampq-vs-llama-cpp]

Per model:
1. The float model as llama.cpp gets it: `ampq quantize MODEL -f fp16 --dtype float16`, exported to an
   all-F16 GGUF (what `convert_hf_to_gguf.py --outtype f16` writes).
2. llama.cpp's own quantization of that file (`llama_model_quantize`, llama-cpp-python) to each
   --types, with its mixing rules (Q4_K_M: Q6_K for some attn_v/ffn_down, Q4_K elsewhere, Q5_0/Q8_0
   where a row is not whole blocks of 256), and its embedding table and head kept in F16 as ampq
   keeps them, so both files differ only in the decoder blocks' linears, which is what AMPQ
   allocates. llama.cpp's default Q4_K_M (embeddings quantized) is scored too, as its own row, against
   ampq of its size with the embedding table in the same type (`--embeddings`, e.g. Q8_0 as int8-g32-sym).
   Each type twice: without and with an importance matrix (`_imatrix.py`: the mean square of each
   linear's inputs over the calibration windows `ampq quantize` uses, passed as llama-imatrix's).
3. ampq at the same file size: `ampq quantize MODEL --target llama.cpp --max-size S --dtype float16`
   and `ampq export --to gguf`, S being llama.cpp's file size less what the GGUF holds beyond
   ampq's safetensors (tokenizer, F32 norms; measured on the F16 pair of step 1). The row says both
   file sizes; if ampq's file came out larger, S is lowered by the excess and the plan made again.
4. Every GGUF scored by llama.cpp (CPU, n_ctx 512, all logits of each window) on the held-out half of
   each text: perplexity, KL to the F16 GGUF's next-token distribution, top-1 agreement with it.
   ampq's own perplexity of each ampq checkpoint (its reference kernel) is beside it: the export
   is exact when the two agree within 1% (llama.cpp quantizes activations to 8 bits in its matmuls).

Writes benchmarks/results/vs_llama_cpp/vs_llama_cpp.{json,md} (`--table` rewrites the .md from the
.json). Needs llama-cpp-python (a benchmark extra).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _imatrix import as_ctypes, importance  # noqa: E402
from _llama import load_llama  # noqa: E402
from _machine import describe, machine  # noqa: E402

import ampq  # noqa: E402
from ampq.data import make_windows  # noqa: E402
from ampq.evaluation import evaluate  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "vs_llama_cpp"
GGML_TYPE_F16 = 1


def run(cmd: list[str]) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{(done.stdout + done.stderr)[-2000:]}")
    return (done.stdout + done.stderr).strip()


def safetensors_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ampq_checkpoint(model: str, args: list[str], out: Path) -> Path:
    if not (out / "ampq.json").exists():
        run([sys.executable, "-m", "ampq", "quantize", model, *args, "--dtype", "float16", "-o", str(out), "--overwrite"])
    gguf = out.with_suffix(".gguf")
    if not gguf.exists():
        run([sys.executable, "-m", "ampq", "export", str(out), "--to", "gguf", str(gguf), "--overwrite"])
    return gguf


class Silenced:
    """llama.cpp writes its log to the process's stderr from C; the table is what matters here."""

    def __enter__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)

    def __exit__(self, *exc):
        os.dup2(self.saved, 2)
        os.close(self.saved)


def llama_quantize(source: Path, out: Path, ftype_name: str, embeddings_f16: bool, imatrix: dict | None = None) -> Path:
    import llama_cpp

    if not out.exists():
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype_name}")
        params.nthread = torch.get_num_threads()
        if embeddings_f16:
            params.token_embedding_type = GGML_TYPE_F16
            params.output_tensor_type = GGML_TYPE_F16
        if imatrix is not None:
            entries, keep = as_ctypes(imatrix)  # noqa: F841 (kept alive until llama.cpp is done)
            params.imatrix = ctypes.cast(entries, ctypes.POINTER(type(entries[0])))
        tmp = out.with_suffix(".part")
        with Silenced():
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), ctypes.byref(params))
        if rc:
            raise RuntimeError(f"llama_model_quantize {ftype_name} of {source} failed ({rc})")
        tmp.rename(out)
    return out


GGUF_MARGIN_BYTES = 64 << 10


# llama.cpp's type of a token table -> the ampq format that stores it as llama.cpp does
AMPQ_FORMAT = {"Q8_0": "int8-g32-sym", "Q6_K": "q6_k", "Q5_K": "q5_k", "Q4_K": "q4_k", "Q3_K": "q3_k", "Q2_K": "q2_k",
               "Q5_0": "int5-g32-sym", "Q5_1": "int5-g32", "Q4_0": "int4-g32-sym", "Q4_1": "int4-g32",
               "IQ4_NL": "iq4_nl", "IQ4_XS": "iq4_xs"}


def tensor_types(gguf: Path) -> dict[str, int]:
    """The count of each type among the blocks' tensors, and the embedding table's and head's types."""
    from gguf import GGUFReader

    tensors = GGUFReader(str(gguf)).tensors
    types = Counter(t.tensor_type.name for t in tensors if t.name.startswith("blk."))
    types.update(f"{t.name.removesuffix('.weight')} {t.tensor_type.name}" for t in tensors
                 if t.name in ("token_embd.weight", "output.weight"))
    return dict(types)


def type_of(gguf: Path, tensor: str) -> str | None:
    from gguf import GGUFReader

    return next((t.tensor_type.name for t in GGUFReader(str(gguf)).tensors if t.name == tensor), None)


def ampq_of_size(model_name: str, work: Path, tag: str, size: int, offset: int, extra: list[str]) -> tuple[Path, Path]:
    """ampq's llama.cpp plan whose GGUF is at most ``size`` bytes: (its checkpoint, its GGUF)."""
    # the F16 pair's overhead misses the few tens of KB that a quantized file's metadata and
    # alignment add: planned that much smaller, a second plan (a whole quantization) is rarely needed
    budget = size - offset - GGUF_MARGIN_BYTES
    for _ in range(3):
        out = work / f"ampq-{tag}-{budget}"
        gguf = ampq_checkpoint(model_name, ["--target", "llama.cpp", "--max-size", str(budget), *extra], out)
        if gguf.stat().st_size <= size:
            return out, gguf
        budget -= gguf.stat().st_size - size
    # never compare a larger ampq file as if it were the same size
    raise RuntimeError(f"{model_name}: ampq's file stayed larger than llama.cpp's {tag} "
                       f"({gguf.stat().st_size:,} > {size:,} bytes) after three plans")


def score(ggufs: dict[str, Path], reference: str, windows) -> dict[str, dict]:
    """Perplexity, KL to the reference's distribution and top-1 agreement of every file, window by
    window (every model loaded once, the reference's log-probabilities never all held at once)."""
    import numpy as np

    with Silenced():
        models = {name: load_llama(path, n_ctx=windows.window, n_batch=windows.window, logits_all=True,
                              n_threads=torch.get_num_threads(), verbose=False) for name, path in ggufs.items()}
    sums = {name: {"nll": 0.0, "kl": 0.0, "top1": 0, "tokens": 0} for name in ggufs}
    for ids in windows.tokens.tolist():
        logp = {}
        for name, llm in models.items():
            llm.reset()
            with Silenced():
                llm.eval(ids)
            logp[name] = torch.log_softmax(torch.from_numpy(np.asarray(llm.scores[: len(ids)], dtype=np.float32)), -1)[:-1]
        target = torch.tensor(ids[1:])[:, None]
        ref = logp[reference]
        for name, lp in logp.items():
            s = sums[name]
            s["nll"] -= lp.gather(-1, target).sum().item()
            s["kl"] += (ref.exp() * (ref - lp)).sum().item()
            s["top1"] += (lp.argmax(-1) == ref.argmax(-1)).sum().item()
            s["tokens"] += len(ids) - 1
        del logp, ref
    del models
    gc.collect()
    return {name: {"perplexity": math.exp(s["nll"] / s["tokens"]), "kl": s["kl"] / s["tokens"],
                   "top1": s["top1"] / s["tokens"], "tokens": s["tokens"]} for name, s in sums.items()}


def table(result: dict) -> str:
    """One table per model: each llama.cpp type beside ampq's plan of the same file size, the
    increase of perplexity over F16 as a ratio (ampq's / llama.cpp's: below 1, ampq loses less)."""
    texts = result["texts"]
    about = (f"{describe(result['machine'])}; llama-cpp-python {result['llama_cpp_python']}, CPU. Scored by "
             f"llama.cpp on the held-out half of {' and '.join(texts)}, {result['windows']} windows of "
             f"{result['window']} tokens each; KL to the F16 file's next-token distribution, nats per token. "
             "llama.cpp's types keep the embeddings and head in F16 as ampq does, but for its default Q4_K_M "
             "(embeddings quantized), set against ampq with `--embeddings` of the same type; ampq = T is "
             "`--target llama.cpp --max-size` of the smaller of T's files (without and with an importance matrix "
             "from ampq's calibration text); the ratios divide ampq's perplexity increase over F16 by llama.cpp's "
             "without and with it.")
    lines = []
    for model in dict.fromkeys(r["model"] for r in result["rows"]):
        rows = {r["name"]: r for r in result["rows"] if r["model"] == model}
        base = rows["F16"]
        head = ["file", "MB"] + [f"{k} {t}" for t in texts for k in ("ppl", "KL", "top-1")] + \
               [f"ppl increase ratio {t} (plain / imatrix)" for t in texts] + \
               ["ampq's own ppl " + texts[0], "linears (ampq: format:algorithm)"]
        lines += [f"**{model}** ({about})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for name, r in rows.items():
            cells = [name, f"{r['file_bytes'] / 1e6:.1f}"]
            for t in texts:
                cells += [f"{r[t]['perplexity']:.3f}", f"{r[t]['kl']:.4f}", f"{r[t]['top1']:.3f}"]
            others = [rows.get(name.replace("ampq = ", "llama.cpp ") + kind) for kind in ("", " imatrix")]
            for t in texts:
                gains = [(r[t]["perplexity"] - base[t]["perplexity"]) / (o[t]["perplexity"] - base[t]["perplexity"])
                         for o in others if o and name.startswith("ampq")]
                cells.append(" / ".join(f"{g:.2f}" for g in gains))
            own = r[texts[0]].get("ampq_perplexity")
            cells.append(f"{own:.3f}" if own else "")
            kinds = r.get("ampq_formats") or r["types"]
            cells.append(", ".join(f"{k} {v}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])))
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,qwen2.5-coder-0.5b")
    p.add_argument("--types", default="Q4_K_M,Q3_K_M,Q5_K_M,Q4_0")
    p.add_argument("--texts", default="wiki,c4")
    p.add_argument("--windows", type=int, default=8, help="evaluation windows of 512 tokens per text")
    p.add_argument("--work", type=Path, default=Path("/tmp/ampq-vs-llama-cpp"))
    p.add_argument("--out", type=Path, default=RESULTS / "vs_llama_cpp.json")
    p.add_argument("--table", action="store_true", help="rewrite the Markdown table from --out and stop")
    args = p.parse_args()
    if args.table:
        args.out.with_suffix(".md").write_text(table(json.loads(args.out.read_text())))
        return
    types = args.types.split(",")
    rows = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    for model_name in args.models.split(","):
        rows = [r for r in rows if r["model"] != model_name]
        work = args.work / model_name
        work.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ref = ampq_checkpoint(model_name, ["-f", "fp16"], work / "f16")
        offset = ref.stat().st_size - safetensors_bytes(work / "f16")
        ggufs: dict[str, Path] = {"F16": ref}
        pairs = []
        matrix = importance(model_name, work / "f16")  # llama.cpp's importance matrix, on ampq's calibration
        for t in types:
            ggufs[f"llama.cpp {t}"] = llama = llama_quantize(ref, work / f"llama-{t}.gguf", t, embeddings_f16=True)
            ggufs[f"llama.cpp {t} imatrix"] = with_matrix = llama_quantize(
                ref, work / f"llama-{t}-imatrix.gguf", t, embeddings_f16=True, imatrix=matrix)
            size = min(llama.stat().st_size, with_matrix.stat().st_size)
            out, gguf = ampq_of_size(model_name, work, t, size, offset, [])
            ggufs[f"ampq = {t}"] = gguf
            pairs.append((t, llama, out, gguf))
            print(f"[{model_name}] {t}: llama.cpp {size:,} B, ampq {gguf.stat().st_size:,} B", flush=True)
        t = "Q4_K_M (default)"
        ggufs[f"llama.cpp {t}"] = llama = llama_quantize(ref, work / "llama-Q4_K_M-default.gguf", "Q4_K_M",
                                                          embeddings_f16=False)
        ggufs[f"llama.cpp {t} imatrix"] = with_matrix = llama_quantize(
            ref, work / "llama-Q4_K_M-default-imatrix.gguf", "Q4_K_M", embeddings_f16=False, imatrix=matrix)
        # ampq of its size with the embedding table (and an untied head) in the types llama.cpp gave them
        extra = ["--embeddings", AMPQ_FORMAT[type_of(llama, "token_embd.weight")]]
        if type_of(llama, "output.weight") is not None:
            extra += ["--lm-head", AMPQ_FORMAT[type_of(llama, "output.weight")]]
        out, gguf = ampq_of_size(model_name, work, "-".join(["Q4_K_M-default", *extra[1::2]]),
                                 min(llama.stat().st_size, with_matrix.stat().st_size), offset, extra)
        ggufs[f"ampq = {t}"] = gguf
        pairs.append((t, llama, out, gguf))
        print(f"[{model_name}] {t}: llama.cpp {llama.stat().st_size:,} B, ampq {gguf.stat().st_size:,} B "
              f"({' '.join(extra)})", flush=True)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(work / "f16")
        scores = {}
        for text in args.texts.split(","):
            windows = make_windows(tok, text, "eval", 512, args.windows)
            scores[text] = score(ggufs, "F16", windows)
            for t, llama, ckpt, gguf in pairs:  # ampq's own kernel on the same windows: is the export exact?
                model, _ = ampq.load_model(str(ckpt))
                scores[text][f"ampq = {t}"]["ampq_perplexity"] = evaluate(model, windows, progress=False).perplexity
                del model
                gc.collect()
        for name, path in ggufs.items():
            row = {"model": model_name, "name": name, "file_bytes": path.stat().st_size, "types": tensor_types(path),
                   **{text: scores[text][name] for text in scores}}
            if name.startswith("ampq"):
                layers = json.loads((path.with_suffix("") / "ampq.json").read_text())["layers"]
                row["ampq_formats"] = dict(Counter(f"{v['format']}:{v['algorithm']}" for v in layers.values()))
            rows.append(row)
            print(f"[{model_name}] {name}: {row['file_bytes']:,} B, " + ", ".join(
                f"{text} ppl {row[text]['perplexity']:.3f} KL {row[text]['kl']:.4f}" for text in scores), flush=True)
        print(f"[{model_name}] {time.perf_counter() - t0:.0f} s", flush=True)
        import importlib.metadata as md

        result = {"machine": machine(), "llama_cpp_python": md.version("llama_cpp_python"), "windows": args.windows,
                  "window": 512, "texts": args.texts.split(","), "rows": rows}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.out.with_suffix(".part")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.rename(args.out)
        args.out.with_suffix(".md").write_text(table(result))


if __name__ == "__main__":
    main()
