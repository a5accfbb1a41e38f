"""The packed CPU kernels against the reference kernel (decode, then matmul): the ground truth."""

import pytest
import torch

from ampq import kernels, memory
from ampq.kernels import cpu_bf16, cpu_planes
from ampq.kernels.cpu import packed_linear, supports
from ampq.kernels.cpu_planes import planes_linear
from ampq.kernels.cpu_planes import supports as planes_supports
from ampq.kernels.cpu_slab import slab_linear
from ampq.kernels.cpu_slab import supports as slab_supports
from ampq.kernels.reference import reference_linear
from ampq.pipeline.blockwise import quantize_linear


@pytest.fixture(autouse=True)
def float32_prompts(monkeypatch):
    """The dispatch these tests check is the same on every processor: prompts on the slab kernel,
    unless a test says the processor multiplies bf16 natively."""
    monkeypatch.setattr(cpu_bf16, "native", lambda: False)


def layer(fmt, out_features, in_features, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(1, in_features) * 4)  # channels of unequal size, as in real layers
    return quantize_linear("l", lin, fmt)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("fmt", ["int4-g32", "int4-g64", "int4-g128", "int4-g64-sym", "int4-g128-zp", "int8-ch", "int8-ch-sym",
                                 "int8-ch-zp", "int3-g128", "int3-g64-sym", "int2-g64", "int2-g32-zp"])
@pytest.mark.parametrize("shape", [(96, 256), (576, 576), (1536, 576)])
@pytest.mark.parametrize("rows", [1, 4, 16])
def test_packed_kernels_match_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 4)
    if not fmt.startswith("int8") and shape[1] % int(fmt.split("-g")[1].split("-")[0]) != 0:
        assert not supports(q)  # a partial last group: the packed int4 kernel cannot hold it
        return
    assert supports(q)
    x = torch.randn(rows, shape[1])
    want = reference_linear(q, x)
    got = packed_linear(q, x)
    assert got.dtype == x.dtype and got.shape == want.shape
    # bf16 activations: about 2^-8 relative on top of the format's own error
    assert rel_err(got, want) < 6e-3, rel_err(got, want)


def test_dispatch_by_rows_mode_and_format():
    q = layer("int4-g64", 128, 256)
    few, many = torch.randn(1, 3, 256), torch.randn(2, 200, 256)
    assert torch.equal(q(many), slab_linear(q, many))  # prefill: decoded a slab at a time
    assert torch.equal(q(few), packed_linear(q, few)) and not torch.equal(q(few), reference_linear(q, few))
    with kernels.use("reference"):
        assert torch.equal(q(few), reference_linear(q, few))
        assert torch.equal(q(many), reference_linear(q, many))
    with pytest.raises(ValueError, match="unknown kernel mode"):
        with kernels.use("fast"):
            pass
    # formats without a packed kernel run as int4 planes for a few rows and are decoded by slabs
    # beyond; those without a lookup form, or with a partial last group, fall back to the reference
    for fmt, shape in [("nf4-b64", (64, 256)), ("int8-g64", (64, 256)), ("fp8-e4m3-ch", (64, 96))]:
        other = layer(fmt, *shape)
        x, more = torch.randn(1, shape[1]), torch.randn(cpu_planes.MAX_ROWS + 1, shape[1])
        assert not supports(other) and planes_supports(other) and slab_supports(other), fmt
        assert torch.equal(other(x), planes_linear(other, x)), fmt
        assert torch.equal(other(more), slab_linear(other, more)), fmt
    # no lookup form or a partial last group: int4 planes up to where decoding the whole weight
    # first pays, the reference beyond; where the planes' groups cannot fit either (an odd width),
    # the reference at every size
    for fmt, shape in [("int4-g64", (64, 96)), ("int5-g64", (64, 256)), ("e3m2-g32", (64, 256))]:
        other = layer(fmt, *shape)
        most = cpu_planes.MAX_ROWS_WITHOUT_SLAB
        x, more = torch.randn(most, shape[1]), torch.randn(most + 1, shape[1])
        assert not slab_supports(other) and planes_supports(other), fmt
        assert torch.equal(other(x), planes_linear(other, x)), fmt
        assert torch.equal(other(more), reference_linear(other, more)), fmt
    odd = layer("int6-g32", 64, 100)
    x = torch.randn(1, 100)
    assert not planes_supports(odd) and torch.equal(odd(x), reference_linear(odd, x))


@pytest.mark.parametrize("fmt", ["nf4-b64", "nf4-b64-dq", "fp4-b64", "fp8-e4m3-ch", "fp8-e5m2-ch", "fp8-e4m3",
                                 "e2m1-g32", "int8-g32-sym", "int8-ch", "int4-g128", "int4-g64-zp", "bf16", "fp16", "mxfp4"])
@pytest.mark.parametrize("shape", [(96, 256), (1536, 512)])
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_slab_kernel_matches_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 5)
    assert slab_supports(q)
    x = torch.randn(rows, shape[1])
    want = reference_linear(q, x)
    got = slab_linear(q, x)
    assert got.dtype == x.dtype and got.shape == want.shape
    assert rel_err(got, want) < 1e-5, rel_err(got, want)  # the same float32 weights, summed by slabs
    got16 = slab_linear(q, x.to(torch.bfloat16))
    assert got16.dtype == torch.bfloat16 and rel_err(got16.float(), want) < 6e-3


def test_slab_and_planes_kernels_follow_an_input_permutation():
    from ampq.nn import QuantLinear

    q = layer("nf4-b64", 64, 256)
    perm = torch.randperm(256)
    permuted = QuantLinear(256, 64, "nf4-b64", q.stored(), q.bias, input_perm=perm)
    x = torch.randn(2, 256)
    assert rel_err(permuted(x), reference_linear(permuted, x)) < 4e-3  # planes
    with kernels.use("lean"):
        assert rel_err(permuted(x), reference_linear(permuted, x)) < 1e-5  # slab
    assert rel_err(permuted(x), q(x)) > 0.1  # the permutation matters


@pytest.mark.parametrize("fmt", ["nf4-b64", "nf4-b64-dq", "fp4-b64", "nf4-b128", "fp8-e4m3-ch", "fp8-e5m2-ch",
                                 "fp8-e4m3", "e2m1-g32", "int8-g32-sym", "int8-g128", "int5-g128", "int6-g128",
                                 "e3m2-g32", "e2m3-ch", "int4-ch", "nvfp4", "mxfp4"])
@pytest.mark.parametrize("shape", [(96, 256), (1536, 512), (64, 96)])
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_planes_kernel_matches_the_reference(fmt, shape, rows):
    q = layer(fmt, *shape, bias=rows != 5)
    assert planes_supports(q)  # lookup forms a chunk at a time; other formats and partial groups whole
    x = torch.randn(rows, shape[1])
    want = reference_linear(q, x)
    got = planes_linear(q, x)
    assert got.dtype == x.dtype and got.shape == want.shape
    # three planes leave ~3e-4 of a group's range: what remains is the bf16 activations' 2^-9, as
    # in the packed kernels (two planes measured 5-6e-3 here)
    assert rel_err(got, want) < 3.5e-3, rel_err(got, want)


def test_planes_are_packed_by_chunks_exactly(monkeypatch):
    # 2064 rows: a 1024-row chunk, then the 1040 left; the packed layout must concatenate by rows
    q = layer("nf4-b64", 2064, 128)
    x = torch.randn(3, 128)
    chunked = planes_linear(q, x)
    assert q.kernel_cache.planes["packed"].shape[0] == 2064
    q.kernel_cache.planes = None
    monkeypatch.setattr(cpu_planes, "_CHUNK", 1 << 20)
    assert torch.equal(planes_linear(q, x), chunked)


@pytest.mark.parametrize("fmt", ["bf16", "fp16"])
def test_16_bit_layers_multiply_their_weight_directly_at_a_row_or_two(fmt):
    from ampq.kernels import cpu

    q = layer(fmt, 96, 256)
    for rows in (1, 2, 3):
        x = torch.randn(rows, 256)
        want = reference_linear(q, x)
        if rows <= cpu.plain_rows(q):
            got = cpu.plain_linear(q, x)
            assert torch.equal(q(x), got) and got.dtype == x.dtype
            assert rel_err(got, want) < 6e-3 and not torch.equal(got, want)  # 16-bit activations
        else:
            assert torch.equal(q(x), slab_linear(q, x))
    assert cpu.plain_rows(q) == {"bf16": 2, "fp16": 1}[fmt]


def test_repacked_copies_are_made_only_while_memory_is_free(monkeypatch):
    import warnings

    x = torch.randn(1, 256)
    monkeypatch.setattr(kernels, "_short_of_memory_told", False)
    monkeypatch.setattr(memory, "available_memory", lambda: (3 << 29, 16 << 30))  # 1.5 of 16 GiB: under 10%
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fmt in ["nf4-b64", "int4-g64", "int8-ch"]:
            q = layer(fmt, 64, 256)
            got = q(x)
            assert q.kernel_cache.planes is None and q.kernel_cache.packed is None, fmt
            assert torch.equal(got, slab_linear(q, x)), fmt
            assert torch.equal(q(x), got), fmt  # decided once per layer
    told = [w for w in caught if "GiB of memory is free" in str(w.message)]
    assert len(told) == 1, [str(w.message) for w in caught]  # one line, not one per layer
    monkeypatch.setattr(memory, "available_memory", lambda: (4 << 30, 16 << 30))  # 4 GiB free: room
    q = layer("nf4-b64", 64, 256)
    assert torch.equal(q(x), planes_linear(q, x)) and q.kernel_cache.planes is not None
    monkeypatch.setattr(memory, "available_memory", lambda: (0, 16 << 30))
    assert torch.equal(q(x), planes_linear(q, x))  # a copy already made is used whatever is free now


def test_free_memory_is_the_containers_where_its_limit_is_lower(tmp_path, monkeypatch):
    from types import SimpleNamespace

    gib = 1 << 30
    monkeypatch.setattr(memory.psutil, "virtual_memory", lambda: SimpleNamespace(available=16 * gib, total=32 * gib))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "memory.max").write_text(f"{4 * gib}\n")
    (v2 / "memory.current").write_text(f"{3 * gib}\n")
    (v2 / "memory.stat").write_text(f"anon {2 * gib}\ninactive_file {gib // 2}\n")
    monkeypatch.setattr(memory, "_CGROUP", v2)
    assert memory.available_memory() == (gib + gib // 2, 4 * gib)  # 4 - 3 used + 0.5 reclaimable cache
    (v2 / "memory.max").write_text("max\n")
    assert memory.available_memory() == (16 * gib, 32 * gib)  # no limit: the machine's
    v1 = tmp_path / "v1" / "memory"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2 * gib}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{gib}\n")
    (v1 / "memory.stat").write_text("cache 0\ntotal_inactive_file 0\n")
    monkeypatch.setattr(memory, "_CGROUP", v1.parent)
    assert memory.available_memory() == (gib, 2 * gib)
    (v1 / "memory.limit_in_bytes").write_text("9223372036854771712\n")  # v1's "unlimited"
    assert memory.available_memory() == (16 * gib, 32 * gib)
    monkeypatch.setattr(memory, "_CGROUP", tmp_path / "none")
    assert memory.available_memory() == (16 * gib, 32 * gib)


@pytest.mark.parametrize("fmt", ["int4-g64", "nf4-b64", "int8-ch"])
def test_moving_a_layer_drops_its_kernel_cache(fmt):
    q = layer(fmt, 64, 256)
    x = torch.randn(1, 256)
    first = q(x)
    cache = q.kernel_cache
    assert cache.short_path is not None and (cache.packed is not None or cache.planes is not None)
    q.to("cpu")  # any move or cast, even to where it is, goes through nn.Module._apply
    assert q.kernel_cache is not cache and q.kernel_cache.packed is None and q.kernel_cache.planes is None
    assert torch.equal(q(x), first)
    # what a move does to the stored tensors, the next call sees: here every float (scale, min) zeroed
    q._apply(lambda t: torch.zeros_like(t) if t.is_floating_point() else t)
    assert torch.equal(q(x), torch.zeros_like(first))


def test_moving_an_adaptive_layer_drops_its_levels_caches():
    from ampq.nested import NestedLinear, nest

    w = torch.randn(64, 256)
    base = layer("int4-g64", 64, 256)
    nested = NestedLinear(base, ["int4-g64-sym"], nest(base, w, ["int4-g64-sym"]))
    x = torch.randn(1, 256)
    first = nested(x)
    assert nested.residuals[0].kernel_cache.short_path is not None
    nested.to("cpu")
    assert base.kernel_cache.short_path is None and nested.residuals[0].kernel_cache.short_path is None
    assert torch.equal(nested(x), first)


def test_lean_mode_keeps_no_repacked_copy():
    x = torch.randn(1, 256)
    for fmt in ["nf4-b64", "int4-g64", "int8-ch", "int3-g64"]:
        q = layer(fmt, 64, 256)
        with kernels.use("lean"):
            got = q(x)
        assert q.kernel_cache.planes is None and q.kernel_cache.packed is None, fmt
        want = slab_linear(q, x) if slab_supports(q) else reference_linear(q, x)  # int3: no slab kernel
        assert torch.equal(got, want), fmt
        assert not torch.equal(q(x), got), fmt  # auto: a repacked kernel


def test_the_short_cpu_path_keeps_every_layer_option():
    # plain layers go straight to the packed kernel; the calibration cache and layers that treat
    # their inputs first (an AWQ input scale here) must still take the full path
    x = torch.randn(1, 256)
    plain = layer("int8-ch", 64, 256)
    assert torch.equal(plain(x), packed_linear(plain, x))
    with kernels.dequantized_weights_cached():
        assert torch.equal(plain(x), torch.nn.functional.linear(x, plain.dequantize(), plain.bias))
    scaled = layer("int8-ch", 64, 256)
    del scaled.input_scale
    scaled.register_buffer("input_scale", torch.rand(256) + 0.5)
    assert torch.equal(scaled(x), packed_linear(scaled, x / scaled.input_scale))
    assert not torch.equal(scaled(x), packed_linear(scaled, x))


# what an AMPQ plan mixes: every CPU kernel at once (packed int3/int4/int8, int4 planes for NF4
# with double quantization, FP8, int5/int6; 16-bit layers multiplied directly)
MIXED = {"*.q_proj": "nf4-b64-dq", "*.k_proj": "int6-g128", "*.v_proj": "int5-g128", "*.o_proj": "bf16",
         "*.gate_proj": "int3-g128", "*.up_proj": "fp8-e4m3-ch", "*.down_proj": "int4-g32"}


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["int4-g64", "nf4-b64", "mixed"])
def test_greedy_decoding_on_the_real_model_agrees(smollm2, fmt):
    import copy

    import ampq

    model, tok = smollm2
    q = ampq.quantize(copy.deepcopy(model), MIXED if fmt == "mixed" else fmt, progress=False)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    fast = q.generate(ids, max_new_tokens=12, do_sample=False)
    # decoding reached no layer through the reference kernel
    layers = [m for m in q.modules() if getattr(m, "is_quantized_linear", False)]
    assert len(layers) == 210 and all(m.kernel_cache.packed is not None or m.kernel_cache.planes is not None or m.format_name == "bf16"
                                      for m in layers)
    with kernels.use("reference"):
        exact = q.generate(ids, max_new_tokens=12, do_sample=False)
    assert fast.shape == exact.shape and (fast == exact).float().mean() > 0.9


@pytest.mark.parametrize("fmt", ["int4-g32-sym", "int4-g64", "int8-ch", "int8-ch-zp", "nf4-b64-dq", "fp8-e4m3-ch",
                                 "int8-g32", "bf16"])
def test_prompts_run_in_bf16_where_the_processor_multiplies_it(monkeypatch, fmt):
    monkeypatch.setattr(cpu_bf16, "native", lambda: True)
    q = layer(fmt, 1536, 576, bias=fmt != "bf16")
    prompt, decode = torch.randn(2, cpu_bf16.MIN_ROWS, 576), torch.randn(1, 1, 576)
    got = q(prompt)
    assert torch.equal(got, cpu_bf16.bf16_linear(q, prompt)) and got.dtype == torch.float32
    assert got.shape == (2, cpu_bf16.MIN_ROWS, 1536)
    want = reference_linear(q, prompt)
    # bf16 activations and weights: about 2^-8 relative on top of the format's own error
    assert 0 < rel_err(got, want) < 6e-3, rel_err(got, want)
    assert kernels.cpu_kernel(q, 2 * cpu_bf16.MIN_ROWS) is cpu_bf16.bf16_linear
    for rows in (1, cpu_bf16.MIN_ROWS - 1):  # decoding, and short prompts: the kernels that never decode
        assert kernels.cpu_kernel(q, rows) is not cpu_bf16.bf16_linear, rows
    for mode in ("reference", "lean"):  # exact, and without copies: never here
        assert kernels.cpu_kernel(q, 2 * cpu_bf16.MIN_ROWS, mode) is not cpu_bf16.bf16_linear, mode
    monkeypatch.setattr(cpu_bf16, "native", lambda: False)
    assert kernels.cpu_kernel(q, 2 * cpu_bf16.MIN_ROWS) is not cpu_bf16.bf16_linear


def test_bf16_detection_reads_the_processor_flags_and_the_override(monkeypatch):
    import importlib

    detect = importlib.reload(cpu_bf16).native  # the real detection, not the fixture's
    for forced in ("0", "1"):
        monkeypatch.setenv("AMPQ_CPU_BF16", forced)
        detect.cache_clear()
        assert detect() is (forced == "1")
    monkeypatch.delenv("AMPQ_CPU_BF16")
    detect.cache_clear()
    assert isinstance(detect(), bool)
    detect.cache_clear()
