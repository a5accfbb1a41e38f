"""transformers integration: after ``import ampq``, ``AutoModelForCausalLM.from_pretrained`` loads ampq checkpoints.

    import ampq  # registers quant_method "ampq" with transformers' quantizer registry
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out/smollm2-int4")   # a folder written by ampq.save, or a hub id
    model.generate(...); model.save_pretrained("out/again")             # loads again the same way

:func:`ampq.save` writes ``quantization_config`` into config.json: ``quant_method: "ampq"`` and the
layer table of ``ampq.json`` (each quantized linear's format, shape, stored tensor names, bias,
activation treatment, AWQ input scale, compute dtype and, for adaptive layers, the residual levels).
It is all the loader needs, so a hub repo id works as well as a local folder: the shapes and
dtypes of the stored tensors come from the safetensors headers transformers has already fetched.

Before the weights load, :class:`AmpqHfQuantizer` replaces each listed ``nn.Linear`` (still on the
meta device) with a :class:`ampq.nn.QuantLinear` (or :class:`ampq.nested.NestedLinear`), and each
experts module with quantized projections with a :class:`ampq.quant_experts.QuantExperts`, whose
buffers are placeholders of exactly the stored shapes and dtypes, so that transformers' own loader
fills ``...q_proj.codes``, ``...q_proj.scale``, ... as they are on disk, with no cast. The model
then computes exactly what :func:`ampq.load` gives.

Registration is lazy: ``import ampq`` does not import transformers' quantizers (seconds of
torch.distributed imports); ampq registers itself the moment transformers imports its quantizer
registry, which every ``from_pretrained`` does first (or at once, where it is already imported).

Not verified here: the SHA-256 of every tensor that ``ampq.json`` records. :func:`ampq.load` is the
verifying loader; this path trusts the files as transformers trusts any checkpoint.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import json
import sys
import warnings

import torch
from torch import nn

from ampq.io.safetensors_file import read_header
from ampq.layer_table import CONFIG_VERSION, EMBEDDING, EXPERTS, QUANT_METHOD, check_entry, install_layer, quantization_config
from ampq.models import replace_module
from ampq.nn import quantized_linears
from ampq.quant_experts import quantized_projections


def _check_config(version, layers, dtype) -> None:
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(f"this ampq quantization_config has version {version!r}; this ampq reads up to "
                         f"{CONFIG_VERSION}: upgrade ampq")
    if not isinstance(layers, dict):
        raise ValueError("ampq quantization_config: 'layers' is not a table; re-save the checkpoint with ampq.save")
    for name, entry in layers.items():
        try:
            check_entry(entry)
        except ValueError as e:
            raise ValueError(f"ampq quantization_config: {e} for layer {name!r}; re-save the checkpoint with "
                             "ampq.save") from None
    if dtype is not None and not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise ValueError(f"ampq quantization_config: unknown dtype {dtype!r}")


_classes: dict[str, type] = {}


def _config_class() -> type:
    """AmpqConfig, defined on first use so that ``import ampq`` does not import transformers."""
    if "AmpqConfig" in _classes:
        return _classes["AmpqConfig"]
    from transformers.utils.quantization_config import QuantizationConfigMixin

    class AmpqConfig(QuantizationConfigMixin):
        """``quantization_config`` of an ampq checkpoint: ``layers`` maps each quantized linear's
        module name to its ampq.json entry (format, shape, tensors, bias, activation, input_scale,
        compute_dtype, and ``nested`` for adaptive layers); ``dtype`` is that of the unquantized
        tensors. It describes a checkpoint; it does not quantize a model on load (ampq.quantize does)."""

        def __init__(self, layers: dict | None = None, dtype: str | None = None, version: int = CONFIG_VERSION,
                     quant_method: str = QUANT_METHOD, **kwargs):
            if quant_method != QUANT_METHOD:
                raise ValueError(f"AmpqConfig takes quant_method {QUANT_METHOD!r}, not {quant_method!r}")
            self.quant_method = QUANT_METHOD
            self.version = version
            self.layers = dict(layers or {})
            self.dtype = dtype
            self.post_init()

        def post_init(self):
            _check_config(self.version, self.layers, self.dtype)

        def to_dict(self) -> dict:
            return {"quant_method": QUANT_METHOD, "version": self.version, "dtype": self.dtype,
                    "layers": json.loads(json.dumps(self.layers))}

        def to_diff_dict(self) -> dict:
            return self.to_dict()

        def __repr__(self) -> str:
            return f"AmpqConfig({len(self.layers)} quantized linears, dtype={self.dtype})"

    AmpqConfig.__module__, AmpqConfig.__qualname__ = __name__, "AmpqConfig"
    _classes["AmpqConfig"] = AmpqConfig
    return AmpqConfig


# ---- building the quantized modules before the weights load ------------------------------------------------
def _header_specs(checkpoint_files) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """Every stored tensor's (dtype, shape), read from the safetensors headers alone."""
    specs = {}
    for path in checkpoint_files or ():
        if str(path).endswith(".safetensors"):
            specs.update({k: (t.dtype, t.shape) for k, t in read_header(path)[0].items()})
    return specs


def replace_linears(model: nn.Module, layers: dict[str, dict], specs) -> None:
    """Put a QuantLinear / NestedLinear / QuantExperts on the meta device in place of each listed
    linear or expert projection of ``model``, its buffers placeholders of the stored shapes and
    dtypes (``specs``)."""
    for name, entry in layers.items():
        if entry.get("kind") == EMBEDDING:
            raise ValueError(f"this checkpoint stores its embedding table {name} quantized (ampq quantize --embeddings), "
                             "which transformers' from_pretrained cannot tie or resize; load it with ampq.load_model, "
                             "or quantize without --embeddings")
        experts = entry.get("kind") == EXPERTS
        try:
            module = model.get_submodule(name.rpartition(".")[0] if experts else name)
        except AttributeError:
            raise ValueError(f"ampq quantization_config lists layer {name!r}, which this model has not") from None
        if not experts and (not isinstance(module, nn.Linear) or tuple(module.weight.shape) != tuple(entry["shape"])):
            raise ValueError(f"ampq quantization_config: {name!r} is not a {entry['shape'][0]}x{entry['shape'][1]} "
                             "linear in this model; config.json does not match its quantization_config")

        def placeholder(key: str, module=module) -> torch.Tensor:
            if key.endswith(".bias"):  # unquantized: it loads in the model's dtype like the other such tensors
                return torch.empty(module.out_features, dtype=module.weight.dtype, device="meta")
            if key not in specs:
                raise ValueError(f"the checkpoint holds no tensor {key}")
            dtype, shape = specs[key]
            return torch.empty(shape, dtype=dtype, device="meta")

        try:
            install_layer(model, name, entry, placeholder)
        except ValueError as e:
            raise ValueError(f"ampq quantization_config: {name!r}: {e}; config.json does not match its "
                             "quantization_config") from None


def _quantizer_class() -> type:
    """AmpqHfQuantizer, defined on first use: importing transformers.quantizers costs seconds
    (it pulls in torch.distributed), which ``import ampq`` should not pay unless transformers does."""
    if "AmpqHfQuantizer" in _classes:
        return _classes["AmpqHfQuantizer"]
    from transformers.quantizers.base import HfQuantizer

    class AmpqHfQuantizer(HfQuantizer):
        """Loads ampq checkpoints in ``from_pretrained``: swaps the listed linears for ampq's quantized
        modules before the weights load, so the stored tensors fill their buffers unchanged."""

        requires_calibration = True  # pre-quantized checkpoints only: ampq.quantize does the quantizing

        def validate_environment(self, *args, **kwargs):
            device_map = kwargs.get("device_map")
            if isinstance(device_map, dict) and "disk" in device_map.values():
                raise ValueError("ampq checkpoints cannot be offloaded to disk; give a device_map without 'disk'")

        def update_attn_implementation(self, config):
            # called before transformers settles dtype="auto": make "auto" the dtype ampq.load builds in
            # (that of the unquantized tensors) rather than whatever float tensor comes first in the file
            if self.quantization_config.dtype is not None:
                config.dtype = getattr(torch, self.quantization_config.dtype)
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            specs = _header_specs(checkpoint_files)
            if not specs:
                raise ValueError("ampq checkpoints load from safetensors files; none were found")
            replace_linears(model, self.quantization_config.layers, specs)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            return model

        def get_state_dict_and_metadata(self, model):
            # save_pretrained: record the layers as they are now (an adaptive model may have switched level)
            qc = quantization_config(model) or {"layers": {}, "dtype": None}
            self.quantization_config.layers, self.quantization_config.dtype = qc["layers"], qc["dtype"]
            return None, {}

        def _dequantize(self, model, dtype=None):
            for name, layer in quantized_linears(model).items():
                weight = layer.dequantize(dtype or torch.float32)
                linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                                   device=weight.device, dtype=weight.dtype)
                linear.weight.data.copy_(weight)
                if layer.bias is not None:
                    linear.bias.data.copy_(layer.bias)
                linear.requires_grad_(False)
                replace_module(model, name, linear)
            for name, (experts, projection) in quantized_projections(model).items():
                weight = torch.stack([experts.expert_weight(projection, e, dtype or torch.float32)
                                      for e in range(experts.num_experts)])
                experts.set_float(projection, weight)
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    AmpqHfQuantizer.__module__, AmpqHfQuantizer.__qualname__ = __name__, "AmpqHfQuantizer"
    _classes["AmpqHfQuantizer"] = AmpqHfQuantizer
    return AmpqHfQuantizer


def __getattr__(name: str):  # ampq.hf.AmpqConfig, ampq.hf.AmpqHfQuantizer (importing transformers)
    if name == "AmpqConfig":
        return _config_class()
    if name == "AmpqHfQuantizer":
        return _quantizer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_AUTO = "transformers.quantizers.auto"


def register() -> bool:
    """Register quant_method "ampq" with transformers' quantizer registry; False where this
    transformers has none."""
    try:
        auto = importlib.import_module(_AUTO)
        config, quantizer = _config_class(), _quantizer_class()
    except ImportError:
        return False
    if not hasattr(auto, "AUTO_QUANTIZER_MAPPING") \
            or not hasattr(auto, "AUTO_QUANTIZATION_CONFIG_MAPPING"):
        return False
    auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = config
    auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = quantizer
    return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Registers ampq right after transformers imports its quantizer registry (which every
    ``from_pretrained`` does), so that ``import ampq`` alone does not import it."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _AUTO:
            return None
        _remove_finder()
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


class _RegisteringLoader(importlib.abc.Loader):
    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        try:
            register()
        except Exception as e:  # noqa: BLE001 - never break transformers' own import
            warnings.warn(f"ampq could not register with transformers' quantizers ({e}); "
                          "from_pretrained will not load ampq checkpoints", stacklevel=2)

    def __getattr__(self, name):  # get_source, get_filename, ... for tracebacks and inspect
        return getattr(self._inner, name)


def _remove_finder() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def _install() -> None:
    if _AUTO in sys.modules:
        register()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


_install()
