"""Quantize a model with a PEER library, then evaluate it with ampq's own evaluation on the same text.

Run with the peers' venv (bash benchmarks/peers/setup.sh makes it):

    benchmarks/.venv-peers/bin/python benchmarks/peers/run_peer.py --peer llmc-gptq \\
        --model smollm2-135m --bits 4 --group 64 --calib wiki --calib-windows 128 --calib-window 512 \\
        --eval-windows 32 --corpora wiki,c4 --out row.json

--model is a Hugging Face folder or a built-in ampq name (smollm2-135m, qwen2.5-coder-0.5b: their
cached folders). Peers see exactly ampq's tokens: calibration windows are
ampq.data.make_windows(tok, calib, "calib", window, n) (first half of the text), evaluation windows
make_windows(tok, corpus, "eval", 512, n) (second half). The quantized model is scored by
ampq.evaluation.evaluate against ampq.evaluation.Reference(original) where the original is the same
folder loaded separately in float32 (ampq's reference for every comparison).

Peers (each on CPU, float32 model and compute):
  llmc-gptq   llm-compressor GPTQModifier, scheme int/num_bits/group/asymmetric (ampq's int4-gN layout;
              --sym for symmetric), lm_head ignored, actorder as llm-compressor defaults it (static)
  llmc-awq    llm-compressor AWQModifier (transform) + QuantizationModifier with the same scheme (AWQ
              scales, then min/max round to nearest). CPU-only torch: IntermediatesCache.pin_memory is
              made a no-op (pin_memory() raises without an accelerator)
  bnb-nf4     bitsandbytes Linear4bit quant_type nf4, blocksize --group (64), --double-quant = compress_statistics
  bnb-fp4     the same with quant_type fp4
  bnb-int8    bitsandbytes Linear8bitLt, LLM.int8() threshold --int8-threshold (6.0), has_fp16_weights=False
  hqq         hqq.core.quantize.HQQLinear, --bits, group --group, axis --hqq-axis (1), compute float32
  quanto      optimum-quanto quantize(weights=qint4|qint8|qfloat8) + freeze; qint4 group as quanto picks it
              (128, else the largest of 96/64/32 dividing the width: SmolLM2 gets 96 on its 576-wide
              linears) unless --quanto-group overrides it; qint8/qfloat8 one scale per output row

llm-compressor refuses a group that does not divide every width (SmolLM2's 576 at 128): use --group 64.
--layers N keeps the first N decoder blocks of both models: for quick development checks only.

Only the decoder blocks' linears are quantized (embeddings, norms and lm_head keep float32), as in
ampq. bits_per_weight counts every tensor the peer stores for those linears, bias excluded as in
ampq: for llm-compressor the tensors of its compressed checkpoint (save_pretrained(save_compressed=
True): weight_packed, weight_scale, weight_zero_point, weight_shape, weight_g_idx if any), for the
others each linear's state_dict() as the library serializes it (bitsandbytes: packed weight, absmax,
quant_map, nested absmax/quant_map, its packed quant-state JSON; SCB for int8; hqq: W_q, scale,
zero and its small metadata tensors; quanto: packed _data, _scale, _shift, input/output_scale).
The row's "storage.roles" lists bytes, dtype and count per tensor role. Scales that follow the
model's dtype are float32 here; bits_per_weight_fp16_params counts them at 16 bits (llm-compressor,
hqq, quanto) as a float16/bfloat16 model would store them; bitsandbytes keeps float32 absmax/SCB.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
import traceback
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # benchmarks/_machine.py

PEERS = ("llmc-gptq", "llmc-awq", "bnb-nf4", "bnb-fp4", "bnb-int8", "hqq", "quanto")
PEER_PACKAGES = {"llmc": ["llmcompressor", "compressed-tensors", "datasets"], "bnb": ["bitsandbytes"],
                 "hqq": ["hqq"], "quanto": ["optimum-quanto"]}


def log(msg: str) -> None:
    print(f"[run_peer {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# model and tokens


def resolve_model(spec: str) -> Path:
    path = Path(spec).expanduser()
    if path.is_dir():
        return path.resolve()
    from ampq import builtin

    if spec in builtin.MODELS:
        return builtin.fetch_model(spec)
    raise SystemExit(f"--model {spec!r} is neither a folder nor a built-in name ({', '.join(builtin.MODELS)})")


def load_fp32(folder: Path):
    from transformers import AutoModelForCausalLM

    # from the folder, so config._name_or_path is the folder (llm-compressor's oneshot re-reads it)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    model.eval()
    model.requires_grad_(False)
    return model


def truncate(model: nn.Module, layers: int | None) -> nn.Module:
    """Keep the first ``layers`` decoder blocks (development runs only: numbers are not comparable)."""
    if not layers:
        return model
    from ampq.models import decoder_blocks

    blocks = decoder_blocks(model)
    name = blocks[0][0].rpartition(".")[0]
    set_module(model, name, nn.ModuleList([b for _, b in blocks[:layers]]))
    model.config.num_hidden_layers = min(layers, len(blocks))
    if isinstance(getattr(model.config, "layer_types", None), list):
        model.config.layer_types = model.config.layer_types[:layers]
    return model


def decoder_linears(model: nn.Module) -> dict[str, nn.Linear]:
    from ampq.report import block_linear_names

    return {n: model.get_submodule(n) for n in block_linear_names(model)}


def set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


# ---------------------------------------------------------------------------------------------
# peers: each quantizes ``model`` in place and returns its config as stored in the row


def llmc_scheme(args):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    # scale_dtype is not set: compressed-tensors 0.19 honours it only for its fp4/mx formats, and the
    # pack-quantized int checkpoint keeps scales in the model's dtype (float32 here; see
    # bits_per_weight_fp16_params for what a float16/bfloat16 model stores)
    return QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
        num_bits=args.bits, type="int", symmetric=args.sym, strategy="group", group_size=args.group))


def quantize_llmc(model, tok, calib, args) -> dict:
    import datasets
    from llmcompressor import oneshot

    if not torch.cuda.is_available():
        # llm-compressor 0.14's AWQ pins cached activations (pin_memory needs an accelerator):
        # on CPU-only torch that raises, so pinning becomes a no-op (it only speeds up H2D copies)
        from llmcompressor.pipelines.cache import IntermediatesCache

        IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None

    scheme = llmc_scheme(args)
    ignore = ["lm_head"]
    config = {"scheme": scheme.model_dump(mode="json", exclude_none=True), "ignore": ignore}
    if args.peer == "llmc-gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier

        kw = dict(config_groups={"group_0": scheme}, ignore=ignore, block_size=args.gptq_block_size,
                  dampening_frac=args.gptq_damp)
        if args.gptq_actorder != "default":
            kw["actorder"] = None if args.gptq_actorder == "none" else args.gptq_actorder
        recipe = [GPTQModifier(**kw)]
        config.update(algorithm="GPTQ", block_size=args.gptq_block_size, dampening_frac=args.gptq_damp,
                      actorder=args.gptq_actorder if args.gptq_actorder != "default" else "default (static)")
    else:
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        recipe = [AWQModifier(duo_scaling=args.awq_duo_scaling if args.awq_duo_scaling == "both" else
                              args.awq_duo_scaling == "true", n_grid=args.awq_grid),
                  QuantizationModifier(config_groups={"group_0": scheme}, ignore=ignore)]
        config.update(algorithm="AWQ scales + RTN (QuantizationModifier)", duo_scaling=args.awq_duo_scaling,
                      n_grid=args.awq_grid)
    n, w = calib.tokens.shape
    ds = datasets.Dataset.from_dict({"input_ids": calib.tokens.tolist(), "attention_mask": [[1] * w] * n})
    oneshot(model=model, tokenizer=tok, dataset=ds, recipe=recipe, num_calibration_samples=n,
            max_seq_length=w, shuffle_calibration_samples=False)
    config["scheme_after"] = _first_scheme(model)
    return config


def _first_scheme(model) -> dict | None:
    for m in model.modules():
        s = getattr(m, "quantization_scheme", None)
        if s is not None:
            return s.model_dump(mode="json", exclude_none=True)
    return None


def quantize_bnb(model, args) -> dict:
    import bitsandbytes as bnb

    if args.peer == "bnb-int8":
        config = {"layer": "Linear8bitLt", "threshold": args.int8_threshold, "has_fp16_weights": False,
                  "weight": "int8 per output row (absmax, weights cast to float16 first), float32 SCB"}
    else:
        quant_type = args.peer.split("-")[1]
        config = {"layer": "Linear4bit", "quant_type": quant_type, "blocksize": args.group,
                  "compress_statistics": args.double_quant, "compute_dtype": "float32",
                  "quant_storage": "uint8"}
    for name, lin in decoder_linears(model).items():
        w = lin.weight.data
        bias = lin.bias is not None
        if args.peer == "bnb-int8":
            q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=bias, has_fp16_weights=False,
                                    threshold=args.int8_threshold, device="meta")
            q.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=bias, compute_dtype=torch.float32,
                                  compress_statistics=args.double_quant, quant_type=quant_type,
                                  quant_storage=torch.uint8, device="meta")
            q.weight = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=args.group,
                                         compress_statistics=args.double_quant, quant_type=quant_type,
                                         quant_storage=torch.uint8, module=q)
        if bias:
            q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        q = q.to("cpu")  # quantization happens on the move to a device (here the CPU)
        q.eval()
        set_module(model, name, q)
    return config


def quantize_hqq(model, args) -> dict:
    from hqq.core.quantize import BaseQuantizeConfig, HQQBackend, HQQLinear

    HQQLinear.set_backend(HQQBackend.PYTORCH)
    qc = BaseQuantizeConfig(nbits=args.bits, group_size=args.group, axis=args.hqq_axis)
    linears = decoder_linears(model)
    # axis 1: W.reshape(-1, group): groups are consecutive weights of the row-major matrix
    straddle = sorted({m.in_features for m in linears.values() if m.in_features % args.group})
    for name, lin in linears.items():
        q = HQQLinear(lin, qc, del_orig=True, compute_dtype=torch.float32, device="cpu")
        q.eval()
        set_module(model, name, q)
    return {"quant_config": {k: v for k, v in qc["weight_quant_params"].items()}, "compute_dtype": "float32",
            "note": ("axis 0: W.reshape(group, -1), each group takes weights at a stride of numel/group"
                     if args.hqq_axis == 0 else
                     f"hqq groups {args.group} consecutive weights of the row-major flattened matrix; widths "
                     f"{straddle} are not multiples of it, so there groups run across row ends" if straddle else None),
            "backend": "PYTORCH", "scale_zero_dtype": "float32 (the compute dtype)"}


def quantize_quanto(model, args) -> dict:
    from optimum.quanto import freeze, qfloat8, qint4, qint8, quantize
    from optimum.quanto.nn import QModuleMixin

    qtype = args.quanto_qtype or {4: "qint4", 8: "qint8"}[args.bits]
    weights = {"qint4": qint4, "qint8": qint8, "qfloat8": qfloat8}[qtype]
    from ampq.models import decoder_blocks

    for _, block in decoder_blocks(model):
        quantize(block, weights=weights)
    groups = {}
    for name, m in model.named_modules():
        if isinstance(m, QModuleMixin):
            if args.quanto_group and qtype == "qint4":
                if m.in_features % args.quanto_group:
                    raise SystemExit(f"--quanto-group {args.quanto_group} does not divide {name}'s {m.in_features} inputs")
                m.weight_group_size = args.quanto_group  # read by QModuleMixin.qweight at freeze
            groups[m.weight_group_size] = groups.get(m.weight_group_size, 0) + 1
    freeze(model)
    # ampq.evaluate runs under torch.inference_mode(), where quanto's tensor subclasses fail
    # ("RuntimeError: Cannot set version_counter for inference tensor" at the weight's .t()): the
    # model's forward leaves inference mode and runs under no_grad instead (same numbers, no autograd)
    forward = model.forward

    def forward_no_inference_mode(*a, **k):
        with torch.inference_mode(False), torch.no_grad():
            return forward(*a, **k)

    model.forward = forward_no_inference_mode
    return {"weights": qtype, "group_sizes": {str(k): v for k, v in groups.items()},
            "group_override": args.quanto_group if qtype == "qint4" else None,
            "optimizer": "MaxOptimizer (min/max, with shift)" if qtype == "qint4" else "AbsmaxOptimizer (per output row)",
            "scale_dtype": "float32 (the weight dtype)",
            "eval_note": "forward runs with inference_mode(False) + no_grad (quanto fails under inference_mode)"}


def quantize(model, tok, calib, args) -> dict:
    if args.peer.startswith("llmc"):
        return quantize_llmc(model, tok, calib, args)
    if args.peer.startswith("bnb"):
        return quantize_bnb(model, args)
    if args.peer == "hqq":
        return quantize_hqq(model, args)
    return quantize_quanto(model, args)


# ---------------------------------------------------------------------------------------------
# storage: what the peer stores for the decoder linears


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes of a tensor; a wrapper subclass (quanto's PackedTensor / QTensor) counts its inner tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        inner, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in inner)
    return t.numel() * t.element_size()


def storage_from_state(model: nn.Module, names: dict[str, tuple[int, int]]) -> dict:
    """Per-role bytes of each decoder linear's state dict (what the peer's own save writes for it)."""
    roles: dict[str, dict] = {}
    for name in names:
        module = model.get_submodule(name)
        for key, t in module.state_dict().items():
            if key == "bias" or not isinstance(t, torch.Tensor):
                continue
            r = roles.setdefault(key, {"bytes": 0, "dtype": str(t.dtype).replace("torch.", ""), "tensors": 0})
            r["bytes"] += tensor_bytes(t)
            r["tensors"] += 1
    return roles


def storage_from_safetensors(folder: Path, names: dict[str, tuple[int, int]]) -> tuple[dict, int]:
    from safetensors import safe_open

    roles: dict[str, dict] = {}
    total = 0
    for f in sorted(folder.glob("*.safetensors")):
        total += f.stat().st_size
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                prefix, _, role = key.rpartition(".")
                if prefix not in names or role == "bias":
                    continue
                t = sf.get_tensor(key)
                r = roles.setdefault(role, {"bytes": 0, "dtype": str(t.dtype).replace("torch.", ""), "tensors": 0})
                r["bytes"] += t.numel() * t.element_size()
                r["tensors"] += 1
    return roles, total


def state_model_bytes(model: nn.Module) -> int:
    """Bytes of every tensor in the model's state dict (a tied head counted once)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if not isinstance(t, torch.Tensor):
            continue
        key = (t.data_ptr(), t.numel(), t.dtype) if type(t) in (torch.Tensor, nn.Parameter) else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += tensor_bytes(t)
    return total


def storage(model, args, names: dict[str, tuple[int, int]], save_dir: Path | None) -> dict:
    weights = sum(o * i for o, i in names.values())
    out: dict = {"linears": len(names), "weights": weights}
    if args.peer.startswith("llmc"):
        with tempfile.TemporaryDirectory(prefix="llmc-save-") as tmp:
            folder = Path(save_dir or tmp)
            model.save_pretrained(str(folder), save_compressed=True)
            roles, total = storage_from_safetensors(folder, names)
            fmt = json.loads((folder / "config.json").read_text()).get("quantization_config", {}).get("format")
        out.update(source=f"compressed checkpoint (save_pretrained(save_compressed=True), format {fmt})",
                   model_bytes=total, model_bytes_note="sum of the saved .safetensors files")
    else:
        roles = storage_from_state(model, names)
        out.update(source="each decoder linear's state_dict() as the peer serializes it",
                   model_bytes=state_model_bytes(model),
                   model_bytes_note="bytes of all tensors in model.state_dict() (tied embedding counted once)")
        if save_dir is not None:
            save_dir.mkdir(parents=True, exist_ok=True)
            from safetensors.torch import save_file
            flat = {k: v.contiguous() for k, v in model.state_dict().items()
                    if isinstance(v, torch.Tensor) and type(v) in (torch.Tensor, nn.Parameter)}
            save_file(flat, str(save_dir / "model.safetensors"))
    total_bytes = sum(r["bytes"] for r in roles.values())
    out["roles"] = roles
    out["bits_per_weight"] = 8 * total_bytes / weights
    # The same count with the float32 parameter tensors (scales, zeros, shifts) at 16 bits, for the
    # peers whose parameter dtype follows the model's (float32 here): what they store for a float16 or
    # bfloat16 model. bitsandbytes keeps float32 absmax/SCB by design, so its count stays as it is.
    follows_model = args.peer in ("hqq", "quanto") or args.peer.startswith("llmc")
    halved = sum(r["bytes"] // 2 for r in roles.values() if follows_model and r["dtype"] == "float32")
    out["bits_per_weight_fp16_params"] = 8 * (total_bytes - halved) / weights
    return out


# ---------------------------------------------------------------------------------------------


def versions() -> dict:
    v = {}
    for d in ["torch", "transformers", "accelerate", "safetensors", "ampq",
              *{p for ps in PEER_PACKAGES.values() for p in ps}]:
        try:
            v[d] = version(d)
        except PackageNotFoundError:
            v[d] = None
    try:
        v["ampq_git"] = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], text=True,
                                       capture_output=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        v["ampq_git"] = None
    return v


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--peer", required=True, choices=PEERS)
    p.add_argument("--model", required=True, help="Hugging Face folder or built-in ampq model name")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group", type=int, default=None,
                   help="group / block size (default: 128 for llmc, 64 for bnb and hqq; unused by bnb-int8, quanto)")
    p.add_argument("--sym", action="store_true", help="llmc: symmetric (default asymmetric, as ampq's int4-g128)")
    p.add_argument("--calib", default="wiki", help="ampq corpus name or text file for calibration (llmc only)")
    p.add_argument("--calib-windows", type=int, default=128)
    p.add_argument("--calib-window", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--eval-window", type=int, default=512)
    p.add_argument("--corpora", default="wiki,c4")
    p.add_argument("--out", type=Path, help="JSON row (also printed)")
    p.add_argument("--save", type=Path, help="keep the peer's saved checkpoint here (default: a temp folder, llmc only)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--layers", type=int, help="development only: keep the first N decoder blocks (both models)")
    # peer options
    p.add_argument("--gptq-block-size", type=int, default=128)
    p.add_argument("--gptq-damp", type=float, default=0.01)
    p.add_argument("--gptq-actorder", default="default", choices=["default", "static", "weight", "none"],
                   help="GPTQ column order (llm-compressor 0.14 accepts static and weight; default static)")
    p.add_argument("--awq-duo-scaling", default="true", choices=["true", "false", "both"])
    p.add_argument("--awq-grid", type=int, default=20)
    p.add_argument("--double-quant", action="store_true", help="bnb 4-bit: compress_statistics=True")
    p.add_argument("--int8-threshold", type=float, default=6.0)
    p.add_argument("--hqq-axis", type=int, default=1, choices=[0, 1])
    p.add_argument("--quanto-qtype", choices=["qint4", "qint8", "qfloat8"])
    p.add_argument("--quanto-group", type=int, help="override quanto's qint4 group size (must divide every width)")
    args = p.parse_args(argv)
    if args.group is None:
        args.group = 128 if args.peer.startswith("llmc") else 64
    if args.peer == "bnb-int8":
        args.bits = 8
    if args.peer in ("bnb-nf4", "bnb-fp4"):
        args.bits = 4
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from ampq.data import make_windows
    from ampq.evaluation import Reference, evaluate
    from transformers import AutoTokenizer

    folder = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(str(folder))
    corpora = [c for c in args.corpora.split(",") if c]
    evals = {c: make_windows(tok, c, "eval", args.eval_window, args.eval_windows) for c in corpora}
    calib = None
    if args.peer.startswith("llmc"):
        calib = make_windows(tok, args.calib, "calib", args.calib_window, args.calib_windows)

    row: dict = {"peer": args.peer, "model": args.model, "model_dir": str(folder), "bits": args.bits,
                 "group": None if args.peer in ("bnb-int8", "quanto") else args.group,
                 "calib": None if calib is None else {"text": args.calib, "windows": len(calib.tokens),
                                                      "window": calib.window},
                 "eval": {"windows": args.eval_windows, "window": args.eval_window, "stride": args.eval_window,
                          "corpora": corpora}}
    model = truncate(load_fp32(folder), args.layers)
    if args.layers:
        row["layers"] = args.layers
    names = {n: (m.out_features, m.in_features) for n, m in decoder_linears(model).items()}
    log(f"{args.peer}: quantizing {len(names)} decoder linears of {folder.name}")
    gc.collect()
    t0 = time.perf_counter()
    try:
        row["config"] = quantize(model, tok, calib, args)
    except Exception as e:
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        row["traceback"] = traceback.format_exc()
        row["versions"] = versions()
        log(f"FAILED: {row['error']}")
        _write(row, args.out)
        return 1
    row["quantize_s"] = time.perf_counter() - t0
    row["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    log(f"quantized in {row['quantize_s']:.1f} s, peak RSS {row['peak_rss_bytes'] / 2**30:.2f} GiB")

    import ampq

    original = truncate(ampq.load_model(str(folder))[0], args.layers)
    row["original"], row["quality"] = {}, {}
    for c, w in evals.items():
        ref = Reference(original, w)
        t = time.perf_counter()
        q = evaluate(model, w, ref, progress=False)
        row["quality"][c] = q.as_dict()
        row["original"][c] = ref.quality.as_dict()
        log(f"{c}: ppl {q.perplexity:.4f} (original {ref.quality.perplexity:.4f}) KL {q.kl:.5f} "
            f"top-1 {q.top1:.4f} [{time.perf_counter() - t:.0f} s]")
    row["perplexity"] = {c: row["quality"][c]["perplexity"] for c in corpora}
    row["kl"] = sum(row["quality"][c]["kl"] for c in corpora) / len(corpora)
    row["top1"] = sum(row["quality"][c]["top1"] for c in corpora) / len(corpora)
    del original
    gc.collect()
    st = storage(model, args, names, args.save)
    row["bits_per_weight"] = st["bits_per_weight"]
    row["model_bytes"] = st["model_bytes"]
    row["storage"] = st
    from _machine import machine

    row["machine"] = machine()
    row["versions"] = versions()
    _write(row, args.out)
    return 0


def _write(row: dict, out: Path | None) -> None:
    text = json.dumps(row, indent=1, default=str)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
    short = {k: row.get(k) for k in ("peer", "bits", "group", "perplexity", "kl", "top1", "bits_per_weight",
                                     "model_bytes", "quantize_s", "peak_rss_bytes", "error")}
    print(json.dumps(short, default=str))


if __name__ == "__main__":
    sys.exit(main())
