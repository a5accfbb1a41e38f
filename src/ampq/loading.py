"""Loading a model from anywhere users keep it: a built-in name, an ampq checkpoint, a folder another
tool quantized (:mod:`ampq.importers`), a Hugging Face folder or hub id, a GGUF file; lazily, with
its weights left in their files, for a quantization under a memory cap (:mod:`ampq.io.lazy`).

``load_model`` gives (model, tokenizer) for any of them, a model to quantize or to run; ``load``
gives a quantized checkpoint's model alone, whichever tool wrote it. Both stay: the CLI and most
users start from a name and need the tokenizer; ``load`` is ``save``'s counterpart.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from ampq import builtin, importers
from ampq.dtypes import parse_dtype
from ampq.errors import AmpqError
from ampq.importers.gguf import keep_quantized as gguf_keep_quantized
from ampq.io.config import model_class
from ampq.io.lazy import lazy_model
from ampq.io.model import load as load_checkpoint
from ampq.memory import fixed_mmap_threshold


def load(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by :func:`ampq.save` from its folder alone, after verifying every hash.
    A folder another tool quantized (GPTQ, AWQ, compressed-tensors, bitsandbytes 4-bit; see
    :mod:`ampq.importers`) loads too, each layer in the ampq format that holds it exactly."""
    if not (Path(directory) / "ampq.json").exists() and importers.quant_method(directory) in importers.LAYOUTS:
        model, notes = importers.load_foreign(directory)
        for line in notes:
            warnings.warn(line, stacklevel=2)
        return model.to(device)
    return load_checkpoint(directory, device)


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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # here: ``import ampq`` stays without it

    dtype = parse_dtype(dtype) or torch.float32
    path = Path(spec).expanduser()
    if spec in builtin.MODELS and not path.exists():
        path = builtin.fetch_model(spec)
    if lazy:
        return _load_lazy(spec, path, dtype)
    if path.is_dir() and (path / "ampq.json").exists():
        return load_checkpoint(path), _tokenizer(path)
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
                for line in gguf_keep_quantized(model, path):
                    print(f"note: {line}", file=sys.stderr)
        elif path.is_dir():
            if not (path / "config.json").exists():
                raise AmpqError(f"{path} is a folder without config.json: not a Hugging Face model or ampq checkpoint")
            tok = _tokenizer(path)
            model = _from_pretrained(path, dtype)
        elif path.exists():
            raise AmpqError(f"{path} is a file, but not a .gguf; give a model folder, a .gguf file or a built-in name")
        else:
            tok = AutoTokenizer.from_pretrained(spec)
            model = _from_pretrained(spec, dtype)
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


def _from_pretrained(where, dtype: torch.dtype):
    """The model of a folder or hub id as the class its config.json names (an encoder as its
    encoder, a vision-language model whole), a causal LM where it names none."""
    from transformers import AutoConfig

    return model_class(AutoConfig.from_pretrained(where)).from_pretrained(where, dtype=dtype)


def _load_lazy(spec: str, path: Path, dtype: torch.dtype):
    if not path.exists() and not path.is_absolute() and spec.count("/") == 1:
        try:
            from huggingface_hub import snapshot_download  # only for a hub id: the hub client is not needed otherwise

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
    # before anything large is read and freed: a lazily loaded model is one to keep under a cap, and
    # glibc's moving mmap threshold would otherwise keep freed chunks resident
    fixed_mmap_threshold()
    model = lazy_model(path, dtype)
    model.config.ampq_source = spec
    return model, _tokenizer(path)


def _tokenizer(path: Path):
    from transformers import AutoTokenizer  # here: ``import ampq`` stays without transformers

    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError):  # saved without a tokenizer: the model still runs
        return None
    # transformers 5 builds an empty tokenizer from config.json alone when the folder holds no
    # tokenizer files; it would turn every text into zero tokens
    return tok if len(tok) > 1 else None


