"""An ampq checkpoint as a compressed-tensors checkpoint: what vLLM (and transformers) load as
``quantization_config.quant_method: "compressed-tensors"``.

The tensors are made by compressed-tensors' own compressors and the config by its
``QuantizationConfig`` / ``ModelCompressor.update_config``: the output is what the library itself
writes. Which scheme holds which format is in :mod:`.schemes`, the tensors of a layer in
:mod:`.tensors`, the files in :mod:`.writer`; the steps every export shares are
:mod:`ampq.exporters.driver`'s. Every layer called exact is checked: the library's own decompression
of what is written must give, bit for bit, the weight ampq decodes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ampq.exporters.compressed_tensors import writer
from ampq.exporters.compressed_tensors.experts import Experts
from ampq.exporters.compressed_tensors.schemes import Scheme, exact_scheme, nearest_scheme
from ampq.exporters.compressed_tensors.tensors import split_tensors
from ampq.exporters.driver import Conversion, Decision, Layer, Target, base_of, change_text, run
from ampq.formats.plain import PlainFloatFormat
from ampq.models import lm_head_name
from ampq.nn import quantized_linears

VLLM_GROUPS = (32, 64, 128)  # the group sizes vLLM's Marlin kernels take (besides per channel)


class CompressedTensors(Target):
    name = "compressed-tensors"
    export_name = "compressed-tensors"
    folder = True
    nearest_how = "to the nearest expressible scheme"

    def start(self, model: nn.Module) -> None:
        self.model = model
        self.dtype = model.get_input_embeddings().weight.dtype
        self.experts = Experts(model, self.directory)
        self.linears = self.experts.linears(model, quantized_linears(model))  # by the names written

    def expert_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return self.experts.layers

    def decide(self, layer: nn.Module) -> Decision:
        if isinstance(base_of(layer).format, PlainFloatFormat) and not getattr(layer, "residuals", None):
            return Decision(None)  # a 16-bit layer: written as it is, listed in ``ignore``
        scheme, why = exact_scheme(layer)
        return Decision(scheme, scheme is not None, why)

    def nearest(self, layer: nn.Module) -> Scheme:
        return nearest_scheme(layer)

    def describe(self, kind: Scheme) -> str:
        return kind.describe()

    def check(self, layers: dict[str, Layer]) -> None:
        patterns = self.experts.check(layers, self.model)
        items = self.experts.by_hub_name(layers)
        writer.check_fused(items, self.linears)
        writer.check_global_scales(items, self.linears)
        self.qconfig, self.groups = writer.quantization_config(items, self.linears, patterns)

    def convert(self, layer: Layer) -> Conversion:
        names = self.experts.parts.get(layer.name, (self.experts.hub(layer.name),))
        rows = self.experts.rows(layer.name, layer.module) if layer.name in self.experts.parts else [layer.module.shape[0]]
        parts, decoded, expected = split_tensors(layer.module, layer.kind, layer.exact, self.dtype, rows)
        tensors = {f"{name}.{k}": v for name, part in zip(names, parts) for k, v in part.items()}
        return Conversion(tensors, layer.kind, decoded, expected)

    def plain(self, key: str, value: torch.Tensor) -> dict:
        return self.experts.plain(key, value)

    def write(self, tmp: Path, tensors: dict, layers: dict[str, Layer]) -> None:
        writer.write(tmp, tensors, self.directory, self.qconfig, self.dtype)

    def summary(self, summary: dict, layers: dict[str, Layer], tensors: dict) -> dict:
        self.warn(layers)
        qconfig, groups = self.qconfig, self.groups
        config_groups = qconfig.config_groups
        n = len(config_groups)
        return {
            "config_groups": {g: {"scheme": s.describe(), "format": s.compression, "layers": len(groups[s]),
                                  "targets": config_groups[g].targets} for g, s in zip(config_groups, groups)},
            "format": qconfig.format, "ignore": qconfig.ignore,
            "line": (f"{summary['out']}: {summary['layers']} quantized layers ({summary['exact']} exact"
                     f"{change_text(summary)}) in {n} config group{'s' if n != 1 else ''} ({qconfig.format}), "
                     f"{len(qconfig.ignore)} ignored, {summary['bytes']:,} bytes"),
        }

    def warn(self, layers: dict[str, Layer]) -> None:
        """What vLLM may not run as written."""
        dtype, groups = self.dtype, self.groups
        odd = sorted({s.group_size for s in groups if s.type == "int" and s.strategy == "group"} - set(VLLM_GROUPS))
        if odd:
            self.warnings.append(f"group size {', '.join(map(str, odd))}: vLLM's Marlin kernels take groups of "
                                 f"{', '.join(map(str, VLLM_GROUPS))} or channels; other kernels may run it")
        head = lm_head_name(self.model, required=False)
        if head in layers and layers[head].kind is not None:
            self.warnings.append(f"the output head ({head}) is quantized: recent vLLM versions run a quantized head "
                                 "from compressed-tensors, older ones expect it unquantized")
        # FP4 scales are E4M3 / power-of-two codes, held exactly by construction
        wide = [n for n, it in layers.items() if not (it.kind and it.kind.fp4)
                and any(k.endswith(".weight_scale") and v.dtype != dtype for k, v in it.tensors.items())]
        if wide and dtype != torch.float32:
            self.warnings.append(f"{len(wide)} layers keep scales that {str(dtype).removeprefix('torch.')} cannot "
                                 "hold exactly (stored as they are); engines that hold scales in the model dtype "
                                 "round them (vLLM: --dtype float16 keeps fp16 scales exact)")
        if dtype != torch.bfloat16 and any(s.fp4 for s in groups):
            self.warnings.append(f"the model is {str(dtype).removeprefix('torch.')}: compressed-tensors decompresses "
                                 "NVFP4/MXFP4 to bfloat16 weights, so load this export in transformers with "
                                 "dtype=torch.bfloat16")
        if dtype == torch.float32 and any(s.type == "int" for s in groups):
            self.warnings.append("the model is float32: vLLM runs it in 16 bits; --dtype float16 keeps ampq's fp16 "
                                 "scales exact")


def export_compressed_tensors(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` as a compressed-tensors checkpoint in ``out``.

    Layers whose format has no exact compressed-tensors counterpart are refused, all in one error,
    unless ``nearest`` (then re-quantized; see :func:`.schemes.nearest_scheme`). q/k/v and gate/up of
    a block must share one scheme (vLLM fuses them). Layers not quantized go into ``ignore``;
    embeddings, norms and the head are written as they are, with ``config.json`` (plus its
    ``quantization_config``), the generation config and the tokenizer files from ``directory``.
    Atomic: written into a hidden folder next to ``out``, then renamed. Returns a summary.
    """
    return run(CompressedTensors, directory, out, nearest, overwrite=overwrite)
