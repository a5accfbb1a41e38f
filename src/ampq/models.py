"""Loading models from anywhere users keep them, and finding their decoder blocks."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from ampq.errors import AmpqError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise AmpqError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None


def _clear_gguf_quantizer(model) -> None:
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def load_model(spec: str, dtype: str | torch.dtype | None = None, keep_quantized: bool = False, lazy: bool = False):
    """(model, tokenizer) for a built-in name, an ampq checkpoint, an HF folder (also one another
    tool quantized: :mod:`ampq.importers`), a GGUF file or a hub id. Unquantized weights load in
    float32 unless ``dtype`` says otherwise. A GGUF file loads dequantized (a model to quantize),
    or with ``keep_quantized`` its Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 layers as the ampq formats that hold
    them exactly (a model to run). With ``lazy`` the model's weights stay in its safetensors files
    (:mod:`ampq.io.lazy`): it is built on the meta device, for a quantization under a memory cap."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ampq import builtin

    dtype = parse_dtype(dtype) or torch.float32
    path = Path(spec).expanduser()
    if spec in builtin.MODELS and not path.exists():
        path = builtin.fetch_model(spec)
    if lazy:
        return _load_lazy(spec, path, dtype)
    if path.is_dir() and (path / "ampq.json").exists():
        from ampq.io.model import load

        return load(path), _tokenizer(path)
    from ampq import importers

    if path.is_dir() and importers.quant_method(path) in importers.LAYOUTS:
        model, notes = importers.load_foreign(path, dtype)
        for line in notes:
            print(f"note: {line}", file=sys.stderr)
        model.config.ampq_source = spec
        return model, _tokenizer(path)
    try:
        if path.is_file() and path.suffix == ".gguf":
            tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
            _clear_gguf_quantizer(model)
            if keep_quantized:
                from ampq.importers.gguf import keep_quantized as keep

                for line in keep(model, path):
                    print(f"note: {line}", file=sys.stderr)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise AmpqError(f"{path} is a folder without config.json: not a Hugging Face model or ampq checkpoint")
            tok = _tokenizer(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        elif path.exists():
            raise AmpqError(f"{path} is a file, but not a .gguf; give a model folder, a .gguf file or a built-in name")
        else:
            tok = AutoTokenizer.from_pretrained(spec)
            model = AutoModelForCausalLM.from_pretrained(spec, dtype=dtype)
    except AmpqError:
        raise
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AmpqError(
            f"cannot load model {spec!r}: not a built-in name ({', '.join(builtin.MODELS)}), a local "
            f"folder or .gguf file, nor reachable on the hub ({first[:200]})") from None
    model.eval()
    model.requires_grad_(False)
    model.config.ampq_source = spec
    return model, tok


def _load_lazy(spec: str, path: Path, dtype: torch.dtype):
    from ampq import importers
    from ampq.io.lazy import lazy_model

    if not path.exists() and not path.is_absolute() and spec.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(spec, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja", "tokenizer*"]))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, no access: all end the same way
            raise AmpqError(f"cannot fetch {spec!r} from the hub ({' '.join(str(e).split())[:160]}); give a local "
                            "folder or a built-in name") from None
    if not path.is_dir() or not (path / "config.json").exists():
        raise AmpqError(f"--max-memory reads a model folder with config.json and safetensors shards; {spec!r} is not "
                        "one (convert a .gguf with transformers first, or run without --max-memory)")
    if (path / "ampq.json").exists() or importers.quant_method(path) is not None:
        raise AmpqError(f"{spec} is already quantized; quantize from the unquantized model")
    model = lazy_model(path, dtype)
    model.config.ampq_source = spec
    return model, _tokenizer(path)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # saved without a tokenizer: the model still runs
        return None
    # transformers 5 builds an empty tokenizer from config.json alone when the folder holds no
    # tokenizer files; it would turn every text into zero tokens
    return tok if len(tok) > 1 else None


def decoder_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of each repeated transformer block: the ModuleList holding most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            n = sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in module.buffers())
            if n > best_params:
                best, best_params = name, n
    if best is None:
        raise AmpqError(f"found no decoder blocks (an nn.ModuleList of layers) in {type(model).__name__}")
    blocks = model.get_submodule(best)
    return [(f"{best}.{i}", block) for i, block in enumerate(blocks)]


def replace_module(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where ``root``'s submodule ``name`` is."""
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def lm_head_name(model: nn.Module) -> str:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is head:
            return name
    raise AmpqError(f"{type(model).__name__} has no output head (lm_head) to quantize")


def tied_embeddings(model: nn.Module) -> bool:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (head is not None and emb is not None and isinstance(head, nn.Linear)
            and head.weight is emb.weight)


def linear_params(model: nn.Module) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if n.endswith("weight"))
