"""NVFP4 and MXFP4 against compressed-tensors itself: the same weight gives the same packed codes,
the same scale bytes and global scale as its observers' arithmetic and its compressors, and ampq
decodes exactly what its decompressors give."""

import pytest
import torch
from compressed_tensors.compressors import MXFP4PackedCompressor, NVFP4PackedCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import MXFP4A16, NVFP4A16
from compressed_tensors.quantization.utils import calculate_qparams, generate_gparam
from compressed_tensors.quantization.utils.fp4_utils import cast_to_fp4

from ampq.formats import get_format
from ampq.formats.microscaled import E2M1

PRESETS = {"nvfp4": (NVFP4A16, NVFP4PackedCompressor), "mxfp4": (MXFP4A16, MXFP4PackedCompressor)}


def hostile_weight(rows=64, cols=256, seed=0):
    """Rows across eight decades, an all-zero group of 32, a group of subnormal-free tiny values,
    a -0.0, exact E2M1 midpoints and values that round the MX scale up."""
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * torch.logspace(-4, 2, rows)[:, None]
    w[3, :32] = 0
    w[5, 32:64] = 1e-30
    w[7, 5] = -0.0
    # absmax 6: MX scale 1, so every E2M1 tie is met exactly, both signs
    w[9, :32] = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0] * 4) * torch.tensor([1.0, -1.0]).repeat(16)
    w[11, :32] = 1.75  # 1.75 * 2^0 rounds the MX scale up a binade
    w[13, :32] = 1.7  # just below: the scale stays, and the codes saturate at 6
    return w


def ct_reference(name, w):
    """compressed-tensors: observer arithmetic (global scale, group scales), then its compressor."""
    preset, compressor = PRESETS[name]
    scheme = QuantizationScheme(targets=["Linear"], **preset)
    groups = w.reshape(w.shape[0], -1, scheme.weights.group_size)
    glob = generate_gparam(w.amin().reshape(1), w.amax().reshape(1)) if name == "nvfp4" else None
    scale, _ = calculate_qparams(groups.amin(-1), groups.amax(-1), scheme.weights, global_scale=glob)
    state = {"weight": w.clone(), "weight_scale": scale}
    if glob is not None:
        state["weight_global_scale"] = glob
    packed = compressor.compress(state, scheme)
    return packed, compressor.decompress(dict(packed), scheme)["weight"]


def test_e2m1_rounding_is_cast_to_fp4():
    x = torch.cat([torch.linspace(-8, 8, 20001), torch.tensor([0.0, -0.0, 0.25, -0.25, 5.0, -5.0, 1e-9, -1e-9])])
    ours = E2M1.decode(E2M1.encode(x + 0.0))
    theirs = cast_to_fp4(x.clone().clamp(-6, 6))
    assert torch.equal(ours, theirs)
    assert torch.equal(torch.signbit(ours), torch.signbit(theirs))


@pytest.mark.parametrize("name", PRESETS)
@pytest.mark.parametrize("seed", [0, 1])
def test_codes_scales_and_decoding_are_compressed_tensors(name, seed):
    w = hostile_weight(seed=seed)
    packed, decompressed = ct_reference(name, w)
    fmt = get_format(name)
    stored = fmt.quantize(w)
    assert torch.equal(stored["codes"], packed["weight_packed"].reshape(-1))
    assert torch.equal(stored["scale"], packed["weight_scale"].view(torch.uint8))
    if name == "nvfp4":
        assert torch.equal(stored["global_scale"], packed["weight_global_scale"])
    assert decompressed.dtype == torch.bfloat16  # compressed-tensors' decoded weight: ampq's, bit for bit
    assert torch.equal(fmt.dequantize(stored, w.shape), decompressed.float())


@pytest.mark.parametrize("name,bits", [("nvfp4", 4 + 8 / 16 + 32 / (4096 * 4096)), ("mxfp4", 4 + 8 / 32)])
def test_exact_bytes(name, bits):
    fmt = get_format(name)
    assert fmt.bits_per_weight((4096, 4096)) == bits
    w = hostile_weight()
    stored = fmt.quantize(w)
    assert sum(t.numel() * t.element_size() for t in stored.values()) == fmt.nbytes(w.shape)


def test_a_zero_tensor_and_a_partial_group():
    for name in PRESETS:
        fmt = get_format(name)
        assert torch.equal(fmt.fake_quantize(torch.zeros(4, 64)), torch.zeros(4, 64))
        w = torch.randn(16, 72)  # 72 inputs: a partial last group
        out = fmt.fake_quantize(w)
        assert out.shape == w.shape and bool(torch.isfinite(out).all())
        assert bool(((out - w).abs() <= w.abs().amax(1, keepdim=True) / 2).all())
