"""ampq.exporters.driver with a toy target (every tensor's name and shape in a text file): the steps
every export shares, independent of the optional packages the real targets need."""

import sys

import pytest
import torch

import ampq
from ampq import AmpqError
from ampq.exporters import export_checkpoint
from ampq.exporters.driver import Conversion, Decision, Target, run
from test_model_io import tiny_llama

torch.set_num_threads(1)


class Listing(Target):
    """Holds int8 layers exactly; re-quantizes the rest to integers (w rounded); 16-bit ones as stored."""

    name = "listing"
    folder = False
    nearest_how = "by rounding"

    def start(self, model):
        self.model = model

    def decide(self, layer):
        if layer.format_name in ("bf16", "fp16"):
            return Decision(None)
        if layer.format_name.startswith("int8"):
            return Decision("int8")
        return Decision(None, False, "not int8")

    def nearest(self, layer):
        return "rounded"

    def convert(self, layer):
        w = layer.module.dequantize(torch.float32)
        if layer.kind is None:
            return Conversion({f"{layer.name}.weight": w}, None)
        decoded = w.clone() if layer.exact else w.round()
        return Conversion({f"{layer.name}.weight": decoded}, layer.kind, decoded, w)

    def write(self, tmp, tensors, layers):
        tmp.write_text("".join(f"{k} {list(v.shape)}\n" for k, v in tensors.items()))

    def summary(self, summary, layers, tensors):
        return {"line": f"{summary['layers']} layers", "tensors": list(tensors)}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    for name, spec in {"int8": "int8-ch-sym", "mixed": {"*mlp*": "int4-g32", "*o_proj": "bf16", "*": "int8-ch-sym"}}.items():
        ampq.save(ampq.quantize(tiny_llama(), spec, progress=False), root / name)
    return root


def test_exact_layers_in_the_models_order_and_a_tied_head_once(checkpoints, tmp_path):
    summary = run(Listing, checkpoints / "int8", tmp_path / "out.txt")
    assert summary["layers"] == summary["exact"] == 14 and summary["converted"] == {}
    names = summary["tensors"]
    assert names[0] == "model.embed_tokens.weight" and names[-1] == "model.norm.weight"
    assert "lm_head.weight" not in names  # tied: written once, as the embeddings
    assert names.index("model.layers.0.self_attn.q_proj.weight") < names.index("model.layers.0.mlp.up_proj.weight")
    assert (tmp_path / "out.txt").read_text().splitlines()[0] == "model.embed_tokens.weight [256, 96]"
    assert summary["bytes"] == (tmp_path / "out.txt").stat().st_size


def test_inexact_layers_are_refused_in_one_error(checkpoints, tmp_path):
    with pytest.raises(AmpqError) as e:
        run(Listing, checkpoints / "mixed", tmp_path / "out.txt")
    text = str(e.value)
    assert "\n" not in text and "6 layers have formats it cannot hold" in text
    assert "int4-g32 (6 layers, e.g. model.layers.0.mlp.gate_proj: not int8)" in text
    assert "--nearest" in text and "by rounding (int4-g32 -> rounded)" in text
    assert list(tmp_path.iterdir()) == []


def test_nearest_reports_how_far_the_weights_moved(checkpoints, tmp_path):
    summary = run(Listing, checkpoints / "mixed", tmp_path / "out.txt", nearest=True)
    assert summary["layers"] == 12 and summary["exact"] == 6  # two bf16 layers written as stored
    model = ampq.load(checkpoints / "mixed")
    w = model.get_submodule("model.layers.1.mlp.down_proj").dequantize(torch.float32)
    change = summary["converted"]["model.layers.1.mlp.down_proj"]
    assert change["from"] == "int4-g32" and change["to"] == "rounded" and change["weights"] == w.numel()
    assert change["max_abs_change"] == float((w.round() - w).abs().max()) > 0
    assert summary["max_abs_change"] == max(c["max_abs_change"] for c in summary["converted"].values())


def test_an_exact_layer_that_does_not_come_back_is_an_internal_error(checkpoints, tmp_path):
    class Broken(Listing):
        def convert(self, layer):
            c = super().convert(layer)
            return Conversion(c.tensors, c.kind, c.decoded + 1, c.expected)

    with pytest.raises(AmpqError, match="internal error: layer model.layers.0.self_attn.q_proj .*max difference 1"):
        run(Broken, checkpoints / "int8", tmp_path / "out.txt")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_old_output_and_no_temporary(checkpoints, tmp_path):
    class Failing(Listing):
        def write(self, tmp, tensors, layers):
            tmp.write_text("half")
            raise OSError("disk full")

    out = tmp_path / "out.txt"
    out.write_text("old")
    with pytest.raises(AmpqError, match="the file exists; pass --overwrite"):
        run(Listing, checkpoints / "int8", out)
    with pytest.raises(OSError, match="disk full"):
        run(Failing, checkpoints / "int8", out, overwrite=True)
    assert out.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_what_is_not_an_ampq_checkpoint_is_refused(checkpoints, tmp_path):
    with pytest.raises(AmpqError, match="not an ampq checkpoint"):
        run(Listing, tmp_path, tmp_path / "out.txt")
    with pytest.raises(AmpqError, match="is a directory"):
        run(Listing, checkpoints / "int8", tmp_path)


def test_targets_by_name(checkpoints, tmp_path, monkeypatch):
    with pytest.raises(AmpqError, match="cannot export to 'onnx': the targets are compressed-tensors, gguf"):
        export_checkpoint(checkpoints / "int8", tmp_path / "x", "onnx")
    # an optional package that is not installed: named, with how to install it
    for name in [m for m in sys.modules if m == "ampq.exporters.gguf" or m.startswith(("ampq.exporters.gguf.", "gguf"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "gguf", None)
    with pytest.raises(AmpqError, match="exporting to gguf needs the gguf package: pip install gguf"):
        export_checkpoint(checkpoints / "int8", tmp_path / "m.gguf", "gguf")
