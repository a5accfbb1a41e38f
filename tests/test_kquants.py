"""llama.cpp's K-quants and IQ4 types as ampq formats, against gguf-py's own decoder
(``gguf.quants.dequantize``, a port of llama.cpp's ``dequantize_row_*``) and, where
llama-cpp-python is installed, against llama.cpp's own quantizer."""

from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest
import torch

from ampq.algorithms import gptq, rtn
from ampq.calibrate import LayerStats
from ampq.formats import GGUF_TYPES, get_format

gguf = pytest.importorskip("gguf")
T = gguf.GGMLQuantizationType

# bits per weight as llama.cpp's block sizes make them (ggml-common.h)
BPW = {"q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "iq4_nl": 4.5, "iq4_xs": 4.25}


def _weights(out=48, cols=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, cols, generator=g) * torch.rand(out, 1, generator=g) * 0.1
    w[1, 5] = 0.9  # an outlier
    w[2] = 0.0  # an all-zero row
    w[3, :256] += 0.05  # a block far from zero on one side
    return w


def _importance(cols=512, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(cols, generator=g).pow(4) * 10 + 1e-3


def _gguf_decode(blocks: torch.Tensor, name: str, shape) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(blocks.numpy(), T[name.upper()]).reshape(shape).copy())


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_bytes_per_weight_are_llama_cpp_s(name):
    fmt = get_format(name)
    shape = (8, 512)
    assert fmt.bits_per_weight(shape) == BPW[name]
    block, size = gguf.GGML_QUANT_SIZES[T[name.upper()]]
    assert fmt.nbytes(shape) == 8 * 512 // block * size
    stored = fmt.quantize(_weights(8, 512))
    assert sum(t.numel() * t.element_size() for t in stored.values()) == fmt.nbytes(shape)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_encoded_blocks_decode_as_gguf_py_decodes_them(name):
    fmt = get_format(name)
    w = _weights()
    for importance in (None, _importance()):
        codes, params = fmt.quantize_codes(w, importance=importance)
        stored = fmt.pack(codes, params)
        ours = fmt.dequantize(stored, tuple(w.shape))
        assert torch.equal(ours, _gguf_decode(stored["blocks"], name, w.shape))
        # what the algorithms see (codes and values before packing) is what is stored
        assert torch.equal(fmt.dequantize_codes(codes, params.values), ours)
        back_codes, back = fmt.unpack(stored, tuple(w.shape))
        assert torch.equal(back_codes, codes)
        assert all(torch.equal(back.values[k], params.values[k]) for k in params.values)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_arbitrary_block_bytes_decode_as_gguf_py_decodes_them(name):
    """Every bit of every field, not only what ampq's encoder writes (fp16 factors kept finite)."""
    fmt = get_format(name)
    block, size = gguf.GGML_QUANT_SIZES[T[name.upper()]]
    rows, cols = 16, 1024
    g = torch.Generator().manual_seed(3)
    raw = torch.randint(0, 256, (rows * cols // block, size), generator=g, dtype=torch.int32).to(torch.uint8)
    # the fp16 fields at their offsets, set to finite values of either sign
    offsets = {"q2_k": (80, 82), "q3_k": (108,), "q4_k": (0, 2), "q5_k": (0, 2), "q6_k": (208,),
               "iq4_nl": (0,), "iq4_xs": (0,)}[name]
    for off in offsets:
        f16 = (torch.rand(raw.shape[0], generator=g) - 0.5).to(torch.float16)
        raw[:, off:off + 2] = f16.reshape(-1, 1).view(torch.uint8)
    blocks = raw.reshape(rows, -1)
    ours = fmt.dequantize({"blocks": blocks}, (rows, cols))
    assert torch.equal(ours, _gguf_decode(blocks, name, (rows, cols)))
    codes, params = fmt.unpack({"blocks": blocks}, (rows, cols))
    assert torch.equal(fmt.pack(codes, params)["blocks"], blocks)  # and it packs back byte for byte


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_error_shrinks_with_the_bits_and_follows_the_importance(name):
    fmt = get_format(name)
    w = _weights(seed=5)
    imp = _importance()
    plain = fmt.fake_quantize(w)
    codes, params = fmt.quantize_codes(w, importance=imp)
    weighted = fmt.dequantize_codes(codes, params.values)

    def err(q):
        return float((((q - w) ** 2) * imp).sum())

    # the importance-weighted search loses less where it counts than the unweighted one
    assert err(weighted) < err(plain)
    # and the relative error stays within what the bits allow (a 2-bit grid: about a third of the range)
    rel = float(((plain - w) ** 2).sum() / (w ** 2).sum())
    assert rel < {2: 0.2, 3: 0.06, 4: 0.02, 5: 0.005, 6: 0.0015}[fmt.bits]


@pytest.mark.parametrize("name", ["q4_k", "q6_k", "iq4_xs"])
def test_rows_that_are_not_whole_blocks_are_not_a_choice(name):
    fmt = get_format(name)
    with pytest.raises(ValueError, match="whole blocks"):
        fmt.quantize_codes(torch.randn(4, 576))


def test_iq4_nl_blocks_are_32_inputs():
    fmt = get_format("iq4_nl")
    w = torch.randn(4, 96)
    stored = fmt.quantize(w)
    assert torch.equal(fmt.dequantize(stored, (4, 96)), _gguf_decode(stored["blocks"], "iq4_nl", (4, 96)))


def _stats(x: torch.Tensor) -> LayerStats:
    s = LayerStats.empty(x.shape[1], "cpu")
    s.add(x)
    return s


@pytest.mark.parametrize("name", ["q3_k", "q4_k", "iq4_xs"])
def test_algorithms_pass_the_importance_and_gptq_lowers_the_output_error(name):
    fmt = get_format(name)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(64, 256, generator=g) * 0.05
    x = torch.randn(2048, 256, generator=g) @ (torch.eye(256) + 0.3 * torch.randn(256, 256, generator=g) / 16)
    x = x * (torch.rand(256, generator=g) * 3)  # inputs of very different size
    stats = _stats(x)
    h = stats.hessian

    def out_err(codes, params):
        dw = fmt.dequantize_codes(codes, params.values) - w
        return float(((dw @ h) * dw).sum())

    plain = out_err(*fmt.quantize_codes(w))
    weighted = out_err(*rtn(w, fmt, stats))
    assert weighted < plain
    assert out_err(*gptq(w, fmt, stats)) < weighted


def _make_qkx3_quants(x, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36):
    """llama.cpp's make_qkx3_quants (ggml-quants.c) for one sub-block, one element at a time, in
    float64: (scale, the minimum subtracted). Each trial of the fan starts from the best minimum so far."""
    lo, hi = min(min(x), 0.0), max(x)
    if hi <= lo:
        return 0.0, -lo
    sum_w, sum_x = sum(w), sum(wi * xi for wi, xi in zip(w, x))
    scale, m = (hi - lo) / nmax, lo
    q = [max(0, min(nmax, round((xi - lo) * nmax / (hi - lo)))) for xi in x]
    best = sum(wi * (scale * qi + m - xi) ** 2 for wi, qi, xi in zip(w, q, x))
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / (hi - m) if hi > m else float("inf")
        q = [round(min(v, nmax)) if v > 0 else 0 for v in ((xi - m) * iscale for xi in x)]
        sl, sl2 = sum(wi * qi for wi, qi in zip(w, q)), sum(wi * qi * qi for wi, qi in zip(w, q))
        sxl = sum(wi * qi * xi for wi, qi, xi in zip(w, q, x))
        det = sum_w * sl2 - sl * sl
        if det > 0:
            this_scale, this_min = (sum_w * sxl - sum_x * sl) / det, (sl2 * sum_x - sl * sxl) / det
            if this_min > 0:
                this_scale, this_min = sxl / sl2, 0.0
            err = sum(wi * (this_scale * qi + this_min - xi) ** 2 for wi, qi, xi in zip(w, q, x))
            if err < best:
                best, scale, m = err, this_scale, this_min
    return scale, -m


@pytest.mark.parametrize("nmax, n", [(3, 16), (15, 32), (31, 32)])
def test_scale_and_min_is_llama_cpp_s_search(nmax, n):
    from ampq.formats.kquant_search import scale_and_min

    g = torch.Generator().manual_seed(nmax)
    x = torch.randn(64, n, generator=g, dtype=torch.float64) * 0.1 + torch.rand(64, 1, generator=g, dtype=torch.float64) * 0.1
    x[0] = -0.3  # flat and negative: no grid to fit
    w = torch.rand(64, n, generator=g, dtype=torch.float64) + 0.01
    # llama.cpp's fan (-0.9 + 0.05 k) puts the largest weight exactly half-way between two codes at
    # k = 8, where float rounding alone decides; a fan that never lands on a tie compares the search
    scale, m = scale_and_min(x, w, nmax, rdelta=0.047)
    for i in range(x.shape[0]):
        ref = _make_qkx3_quants(x[i].tolist(), w[i].tolist(), nmax, rdelta=0.047)
        assert (float(scale[i]), float(m[i])) == pytest.approx(ref, rel=1e-9, abs=1e-12), i


# ---- against llama.cpp's own quantizer (ggml_quantize_chunk), where llama-cpp-python is installed ----

def _ggml():
    llama_cpp = pytest.importorskip("llama_cpp")
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    for name in ("libggml-base.so", "libggml.so"):
        path = lib_dir / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            if hasattr(lib, "ggml_quantize_chunk"):
                lib.ggml_quantize_chunk.restype = ctypes.c_size_t
                lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                                    ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
                return lib
    pytest.skip("llama-cpp-python's libggml has no ggml_quantize_chunk")


def _llama_cpp_quantize(lib, w: np.ndarray, qtype, imatrix: np.ndarray | None) -> np.ndarray:
    rows, cols = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    out = np.zeros((rows, cols // block * size), dtype=np.uint8)
    src = np.ascontiguousarray(w, dtype=np.float32)
    imp = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    lib.ggml_quantize_chunk(int(qtype), src.ctypes.data, out.ctypes.data, 0, rows, cols,
                            None if imp is None else imp.ctypes.data)
    return out


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_as_good_as_llama_cpp_s_quantizer_with_an_importance_matrix(name):
    lib = _ggml()
    fmt = get_format(name)
    qtype = T[name.upper()]
    w = _weights(64, 1024, seed=11)
    imp = _importance(1024)
    theirs = gguf.quants.dequantize(_llama_cpp_quantize(lib, w.numpy(), qtype, imp.numpy()), qtype)
    codes, params = fmt.quantize_codes(w, importance=imp)
    ours = fmt.dequantize_codes(codes, params.values)

    def err(q):
        return float(((torch.as_tensor(q).reshape(w.shape) - w) ** 2 * imp).sum())

    # the same searches in float64 rather than float32: they differ only where a rounding tips a
    # near tie (measured: within 0.11% either way on every type; before the fan of make_qkx3_quants
    # followed its running minimum, q2_k was 5.7% and q4_k 2.7% worse here)
    assert err(ours) <= 1.005 * err(theirs), (err(ours), err(theirs))
