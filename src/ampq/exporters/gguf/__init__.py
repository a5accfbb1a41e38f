"""An ampq checkpoint as one GGUF file: what llama.cpp runs (and transformers' GGUF loader reads).

Written with the ``gguf`` package's own ``GGUFWriter``, in llama.cpp's conventions: its tensor
names (``token_embd``, ``blk.N.attn_q``, ..., ``output_norm``, ``output``, from gguf-py's tensor
name map), its hyperparameter keys, its tokenizer keys, and what its ``convert_hf_to_gguf.py``
changes in tensors (:mod:`.architectures`): the row permutation of ``attn_q`` / ``attn_k`` for
the llama architecture, Gemma's norms plus one. The permutation reorders output rows; GGUF
blocks, like ampq's groups, run along the inputs, so quantized rows move whole.

Which type holds which format is in :mod:`.qtypes` (with the table), the blocks in
:mod:`.blocks`, the file in :mod:`.writer`, the tokenizer in :mod:`.vocab`; the steps every export
shares are :mod:`ampq.exporters.driver`'s. Every exact layer is checked: gguf-py's
``gguf.quants.dequantize`` of the blocks written must equal ampq's decoded weight bit for bit.

Embeddings and an untied output head are written as stored (F32, F16 or BF16; a table quantized with
``--embeddings`` as its type, which llama.cpp also multiplies by as the head where tied); 1-D tensors
(norms, biases) as F32, as llama.cpp's converter does. The tokenizer (byte-level BPE as
``tokenizer.ggml.model`` "gpt2", SentencePiece BPE as "llama": :mod:`.vocab`) is written as
llama.cpp's converter writes it: tokens, token types, merges or scores, special token ids,
add-BOS/EOS flags and the chat template.

Mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE): each expert's QuantLinear is
repacked as a linear is and checked the same way, then the experts of each projection are stacked
into llama.cpp's 3D ``ffn_*_exps`` tensors (:mod:`.experts`).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from torch import nn
from transformers import AutoConfig

from ampq.errors import AmpqError
from ampq.exporters.driver import Conversion, Decision, Layer, Target, base_of, change_text, decoded_weight, run
from ampq.exporters.gguf import architectures, writer
from ampq.exporters.gguf.blocks import exact_blocks, permute, plain_array, requantize
from ampq.exporters.gguf.experts import Experts
from ampq.exporters.gguf.qtypes import BLOCK, exact_type, nearest_types
from ampq.exporters.gguf.vocab import read_tokenizer
from ampq.models import tied_embeddings


class Gguf(Target):
    name = "GGUF"
    export_name = "gguf"
    folder = False
    holds = (f"GGUF holds int4/int5 (asymmetric or -sym) and int8-sym with groups of a multiple of {BLOCK} "
             "exactly (Q4_1/Q4_0, Q5_1/Q5_0, Q8_0), and llama.cpp's own q2_k..q6_k, iq4_nl, iq4_xs. ")
    nearest_how = "with gguf-py to the types it writes, per layer whichever moves the weights least"
    quantized_embeddings = True  # token_embd in any type; llama.cpp reads it as the head too when tied

    def check_source(self) -> None:
        self.spec = architectures.check(self.directory, AutoConfig.from_pretrained(self.directory), self.warnings)
        self.arch = self.spec.name
        self.pooling = None
        if self.spec.encoder:
            manifest = self.directory / "ampq.json"
            source = json.loads(manifest.read_text()).get("source") if manifest.is_file() else None
            self.pooling = architectures.pooling(self.directory, source, self.warnings)

    def start(self, model: nn.Module) -> None:
        self.model = model
        config = self.config = model.config
        self.vocab_size = int(getattr(config, "vocab_size", 0) or model.get_input_embeddings().weight.shape[0])
        # refused here, before the work of converting, when it cannot be written
        self.tokenizer = read_tokenizer(self.directory, self.vocab_size, self.warnings)
        self.name_map = gguf.get_tensor_name_map(self.spec.arch, config.num_hidden_layers)
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.experts = Experts(model, self.directory, self._name)

    def expert_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        return self.experts.layers

    def check(self, layers: dict[str, Layer]) -> None:
        self.experts.check(layers, self.allow_nearest)

    def decide(self, layer: nn.Module) -> Decision:
        qtype, widened, why = exact_type(layer)
        return Decision(qtype, qtype is not None, why, widened)

    def nearest(self, layer: nn.Module) -> tuple[T, ...]:
        return nearest_types(layer)  # the conversion keeps the one that moves the weights least

    def describe(self, kind) -> str:
        return " or ".join(t.name for t in kind) if isinstance(kind, tuple) else kind.name

    def _heads_to_permute(self, module_name: str) -> int | None:
        """The head count llama.cpp permutes the rows of ``module_name`` by, or None."""
        if not self.spec.permute_qk:
            return None
        leaf = module_name.rpartition(".")[2]
        return self.heads if leaf == "q_proj" else self.kv_heads if leaf == "k_proj" else None

    def _name(self, key: str) -> str:
        return self._type_and_name(key)[1]

    def _type_and_name(self, key: str) -> tuple:
        mapped = self.name_map.get_type_and_name(key, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise AmpqError(f"cannot export {self.directory} to GGUF: tensor {key} has no llama.cpp name in the "
                            f"{self.arch} architecture; the checkpoint holds something this exporter does not write")
        return mapped

    def convert(self, layer: Layer) -> Conversion:
        base, qtype = base_of(layer.module), layer.kind
        n_head = self._heads_to_permute(layer.name)
        weight = decoded_weight(layer.module)
        if n_head is not None:
            weight = permute(weight, n_head)
        expected = weight.numpy()
        if not layer.exact:  # re-quantized from the weight already in llama.cpp's row order
            data, decoded, qtype = requantize(np.ascontiguousarray(expected), qtype)
        else:
            if qtype in (T.F16, T.BF16):
                data, _ = plain_array(base.stored()["weight"].reshape(base.shape))
            else:
                data = exact_blocks(base, qtype)
            decoded = gguf.quants.dequantize(data, qtype).reshape(base.shape)
            if n_head is not None:
                data, decoded = permute(data, n_head), permute(decoded, n_head)
        if layer.name in self.experts.where:  # one expert's rows of its projection's 3D tensor(s)
            owner, projection, e = self.experts.where[layer.name]
            tensors = {k: (v, qtype) for k, v in self.experts.split(owner, projection, data, e).items()}
            return Conversion(tensors, qtype, decoded, expected)
        tensors = {self._name(f"{layer.name}.weight"): (np.ascontiguousarray(data), qtype)}
        if layer.module.bias is not None:
            bias = layer.module.bias.detach().float().numpy()
            tensors[self._name(f"{layer.name}.bias")] = (permute(bias, n_head) if n_head else bias, T.F32)
        return Conversion(tensors, qtype, decoded, expected)

    def plain(self, key: str, value: torch.Tensor) -> dict:
        if self.spec.encoder and key.startswith(architectures.ENCODER_DROPPED):
            if key.startswith("pooler.") and not any("pooler" in w for w in self.warnings):
                self.warnings.append("the pooler (pooler.dense, a dense layer over the [CLS] state) is not written: llama.cpp "
                                     "pools the token states by the pooling type instead, as its converter does")
            return {}
        experts = self.experts.plain(key, value)
        if experts is not None:
            return experts
        data, qtype = plain_array(value)
        kind, name = self._type_and_name(key)
        if self.experts.is_router(kind):  # routers in F32, as llama.cpp's converter writes them
            data, qtype = value.detach().float().numpy(), T.F32
        if value.dim() == 1:  # norms and biases: F32, as llama.cpp's converter writes them
            data, qtype = value.detach().float().numpy(), T.F32
            if self.spec.norm_shift and key.endswith("norm.weight"):
                data = data + np.float32(self.spec.norm_shift)
        n_head = self._heads_to_permute(key.rpartition(".")[0])
        if n_head is not None:
            data = permute(data, n_head)
        return {name: (np.ascontiguousarray(data), qtype)}

    def write(self, tmp: Path, tensors: dict, layers: dict[str, Layer]) -> None:
        tensors = self.experts.stack(tensors)
        self.tensor_count = len(tensors)
        self.file_type = writer.file_type([it.kind for it in layers.values()])
        name = (self.config.to_dict().get("_model_name_or_path") or "").strip() or self.directory.name
        self.tokenizer_summary = writer.write(tmp, self.spec, self.config, self.vocab_size, name, self.file_type,
                                              self.tokenizer, tensors, self.pooling)

    def summary(self, summary: dict, layers: dict[str, Layer], tensors: dict) -> dict:
        items = layers.values()
        widened = sorted({it.source for it in items if it.widened})
        if widened:
            self.warnings.append(f"{', '.join(widened)} held exactly in wider GGUF blocks "
                                 f"({', '.join(sorted({it.kind.name for it in items if it.widened}))}): the file "
                                 "is larger than the checkpoint")
        lost = sorted({base_of(it.module).activation for it in items if base_of(it.module).activation})
        if lost:
            self.warnings.append(f"activation schemes ({', '.join(lost)}) are not carried: llama.cpp handles "
                                 "activations its own way")
        counts = Counter(it.kind for it in items)
        types = {t.name: n for t, n in counts.most_common()}
        return {
            "architecture": self.arch, "widened": sum(1 for it in items if it.widened), "types": types,
            "formats": {src: sorted({it.kind.name for it in items if it.source == src})
                        for src in dict.fromkeys(it.source for it in items)},
            "file_type": self.file_type, "tensors": self.tensor_count, "tied_embeddings": tied_embeddings(self.model),
            "tokenizer": self.tokenizer_summary,
            "line": (f"{summary['out']}: GGUF ({self.arch}), {summary['layers']} quantized layers ({summary['exact']} "
                     f"exact{change_text(summary)}; {', '.join(f'{n} {t}' for t, n in types.items())}), "
                     f"{self.tensor_count} tensors, {summary['bytes']:,} bytes"),
        }


def export_gguf(directory, out, nearest: bool = False, *, overwrite: bool = False) -> dict:
    """Write the ampq checkpoint ``directory`` as the GGUF file ``out`` (llama, mistral, qwen2, qwen3,
    gemma2, gemma3, phi3, the mixture-of-experts Mixtral, Qwen2-MoE, Qwen3-MoE and OLMoE, and BERT
    encoders: see :mod:`.architectures`).

    Quantized layers whose format has an exact GGUF counterpart are repacked block by block and
    checked bit for bit against ampq's decoding (see :mod:`.qtypes` for the table); the others are
    refused, all in one error, unless ``nearest`` (then re-quantized by gguf-py to the nearest type
    it can write, the change reported). Atomic: written next to ``out``, then renamed over it; an
    existing ``out`` is refused unless ``overwrite``. Returns a summary.
    """
    return run(Gguf, directory, out, nearest, overwrite=overwrite)
