"""A compressed-tensors checkpoint on disk: the config groups (one scheme each, with the targets
compressed-tensors' own matcher reads back to the same layers), ``config.json`` with the
``quantization_config`` that ``ModelCompressor.update_config`` writes, the shards, and the
checkpoint's other files (generation config, tokenizer) copied over."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.quantization import QuantizationConfig
from compressed_tensors.utils.match import match_name

from ampq.errors import AmpqError
from ampq.exporters.compressed_tensors.schemes import Scheme
from ampq.exporters.driver import Layer, base_of
from ampq.io.checkpoint import write_shards
from ampq.models import fused_groups

# Layers vLLM fuses into one (qkv_proj, gate_up_proj): they must share one scheme.
FUSED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
MAX_SHARD_BYTES = 2_000_000_000
_OWN_FILES = {"ampq.json", "config.json", "model.safetensors.index.json"}


def check_fused(items: dict[str, Layer], linears: list[str]) -> None:
    """vLLM fuses q/k/v (and gate/up) of a block into one layer with one scheme; refuse what it cannot."""
    present = set(linears)
    parents: dict[str, set[str]] = {}
    for name in linears:
        parent, _, child = name.rpartition(".")
        parents.setdefault(parent, set()).add(child)
    for parent, children in parents.items():
        for fused in FUSED:
            members = [c for c in fused if c in children]
            if len(members) < 2:
                continue
            full = [f"{parent}.{c}" if parent else c for c in members]
            status = {c: (items[n].kind if n in items else None) for c, n in zip(members, full) if n in present}
            if len(set(status.values())) > 1:
                def show(c):
                    n = f"{parent}.{c}" if parent else c
                    s = status[c]
                    return f"{c} is {items[n].source} ({s.describe()})" if s is not None else (
                        f"{c} is {items[n].source} (unquantized)" if n in items else f"{c} is not quantized")
                raise AmpqError(f"{parent or 'the model'}: vLLM fuses {'/'.join(members)} into one layer with one "
                                f"scheme, but {', '.join(show(c) for c in members)}; quantize them with one format "
                                "(ampq ties them unless --untied) and export again")


def check_global_scales(items: dict[str, Layer], linears: list[str]) -> None:
    """vLLM decodes fused NVFP4 layers with the largest of their global scales (its W4A16 NVFP4
    scheme takes ``weight_global_scale.max()``): every other member would decode wrong."""
    for group in fused_groups([n for n in linears if n in items and items[n].kind is not None
                               and items[n].kind.type == "nvfp4" and hasattr(base_of(items[n].module), "stored")]):
        scales = {n: float(base_of(items[n].module).stored()["global_scale"].reshape(-1)[0]) for n in group}
        if len(set(scales.values())) > 1:
            parent = group[0].rpartition(".")[0].rpartition(".")[0]
            raise AmpqError(f"{parent or 'the model'}: vLLM fuses {', '.join(n.rpartition('.')[2] for n in group)} into "
                            f"one layer with one NVFP4 global scale, but they hold different ones "
                            f"({', '.join(f'{v:.6g}' for v in scales.values())}); quantize them again with this ampq "
                            "version (it gives fused layers one global scale) and export again")


def _pattern(name: str) -> str:
    return r"\.".join(r"\d+" if part.isdigit() else re.escape(part) for part in name.split("."))


def _targets(names: list[str], linears: list[str]) -> list[str]:
    """The group's layers as targets: one ``re:`` pattern (block index as \\d+) where the pattern
    covers no linear outside the group, else the exact module names."""
    mine = set(names)
    by_pattern: dict[str, list[str]] = {}
    for n in names:
        by_pattern.setdefault(_pattern(n), []).append(n)
    everywhere: dict[str, int] = {}
    for n in linears:
        p = _pattern(n)
        if p in by_pattern:
            everywhere[p] = everywhere.get(p, 0) + 1
    targets = []
    for p, members in by_pattern.items():
        if len(members) > 1 and everywhere[p] == len(members) and all(m in mine for m in members):
            targets.append(f"re:{p}$")  # matched from the start of the name
        else:
            targets.extend(members)
    return targets


def _check_targets(config_groups: dict, groups: dict, items: dict[str, Layer], linears: list[str],
                   ignore: list[str]) -> None:
    """Every quantized linear must match the targets of its own group and no other, as
    compressed-tensors' own matcher reads them ("Linear" matches every linear; ``ignore`` wins)."""
    wanted = dict(zip(groups, config_groups))  # scheme -> its group's name
    for name in linears:
        if any(match_name(name, i) for i in ignore):
            continue
        hits = [g for g, ct in config_groups.items()
                if any(t == "Linear" or match_name(name, t) for t in ct.targets)]
        want = [wanted[items[name].kind]]
        if hits != want:
            raise AmpqError(f"internal error: {name} would match config groups {hits}, not {want}; please report it")


def _named(names: list[str], patterns: dict[str, str]) -> list[str]:
    return list(dict.fromkeys(patterns.get(n, n) for n in names))


def quantization_config(items: dict[str, Layer], linears: list[str],
                        patterns: dict[str, str] | None = None) -> tuple[QuantizationConfig, dict]:
    """The ``quantization_config`` for the decided layers (``linears``: every linear, in the model's
    order) and each scheme's layers. One scheme: every linear not ignored, as llm-compressor writes
    it. Several: each group's layers by name. Layers not quantized go into ``ignore``. ``patterns``:
    names written as a pattern that stands for them and their like (a MoE layer's experts)."""
    patterns = patterns or {}
    groups: dict[Scheme, list[str]] = {}
    for name in linears:
        if name in items and items[name].kind is not None:
            groups.setdefault(items[name].kind, []).append(name)
    ignore = _named([n for n in linears if n not in items or items[n].kind is None], patterns)

    def targets(names):
        return _targets([n for n in names if n not in patterns], linears) + _named(
            [n for n in names if n in patterns], patterns)

    config_groups = {f"group_{i}": scheme.build(["Linear"] if len(groups) == 1 else targets(names))
                     for i, (scheme, names) in enumerate(groups.items())}
    _check_targets(config_groups, groups, items, linears, ignore)
    formats = {s.compression for s in groups}
    qconfig = QuantizationConfig(config_groups=config_groups, ignore=ignore, quantization_status="compressed",
                                 format=formats.pop() if len(formats) == 1 else "mixed-precision")
    return qconfig, groups


def write(folder: Path, tensors: dict[str, torch.Tensor], source: Path, qconfig: QuantizationConfig,
          dtype: torch.dtype) -> None:
    """The checkpoint into ``folder``: shards, ``config.json`` (``source``'s, without ampq's keys,
    saying ``dtype`` for the unquantized weights) and ``source``'s other files."""
    write_shards(folder, tensors, MAX_SHARD_BYTES)
    config = json.loads((source / "config.json").read_text())
    for key in [k for k in config if k.startswith("ampq") or k == "quantization_config"]:
        del config[key]
    # the dtype of the unquantized weights written (a config re-saved by ampq may say otherwise)
    for key in [k for k in ("dtype", "torch_dtype") if k in config] or ["dtype"]:
        config[key] = str(dtype).removeprefix("torch.")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    ModelCompressor(quantization_config=qconfig).update_config(str(folder))
    for p in sorted(source.iterdir()):
        if p.is_file() and p.name not in _OWN_FILES and not p.name.endswith(".safetensors"):
            shutil.copyfile(p, folder / p.name)
