"""ampq bench: what it reports is what it measured, in the units it says."""

import json

import ampq
from ampq import bench
from ampq.cli import main
from ampq.report import model_bytes
from test_model_io import tiny_llama


def test_bench_rows_are_consistent(tmp_path):
    model = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    rows = bench.bench(model, batches=(1, 2), prompt_tokens=8, new_tokens=4, repeats=2)
    assert [r.batch for r in rows] == [1, 2]
    for r in rows:
        assert r.prefill_tokens_per_s > 0 and r.decode_tokens_per_s > 0 and r.latency_p99_ms >= r.latency_p50_ms > 0
        # the definitions the table states
        assert abs(r.decode_tokens_per_s - r.batch * 1e3 / r.latency_p50_ms) < 1e-6 * r.decode_tokens_per_s
        assert abs(r.bandwidth_gb_s - r.weight_bytes_per_step / (r.latency_p50_ms / 1e3) / 1e9) < 1e-9 + 1e-6 * r.bandwidth_gb_s
        assert r.predicted_bytes == model_bytes(model) + bench.kv_cache_bytes(model, r.batch, 12)
    # quantized linears count as stored; the tied head is read in full
    head = model.get_output_embeddings().weight
    linears = sum(m.nbytes() for m in model.modules() if isinstance(m, ampq.QuantLinear))
    assert rows[0].weight_bytes_per_step == linears + head.numel() * head.element_size()
    # a KV cache of 2 x layers x batch x tokens x kv heads x head size x 4 bytes
    assert bench.kv_cache_bytes(model, 3, 10) == 2 * 2 * 3 * 10 * 2 * 24 * 4


def test_bench_cli_writes_json_and_plot(tmp_path, monkeypatch):
    ampq.save(ampq.quantize(tiny_llama(), "int8-ch", progress=False), tmp_path / "m")
    out, png = tmp_path / "b.json", tmp_path / "b.png"
    assert main(["bench", str(tmp_path / "m"), "--batch", "1,4", "--prompt-tokens", "8", "--new-tokens", "3",
                 "--repeats", "1", "--json", str(out), "--plot", str(png)]) == 0
    result = json.loads(out.read_text())
    assert [r["batch"] for r in result["rows"]] == [1, 4] and isinstance(result["rows"][0]["measured_bytes"], int)
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["bench", str(tmp_path / "m"), "--batch", "one"]) == 2


def test_resident_memory_sees_an_allocation():
    import torch

    before = bench.resident_bytes()
    block = torch.ones(200 << 20, dtype=torch.uint8)  # 200 MiB, written so the pages are resident
    grown = bench.resident_bytes() - before
    assert 150 << 20 < grown < 260 << 20, grown
    del block


def test_a_prompt_computes_the_logits_of_its_last_position_only(monkeypatch):
    import torch

    from ampq.models import last_logits_only

    model = tiny_llama()
    assert last_logits_only(model) == {"logits_to_keep": 1}
    assert last_logits_only(torch.nn.Linear(2, 2)) == {}
    ids = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.allclose(model(ids, **last_logits_only(model)).logits[:, -1], model(ids).logits[:, -1], atol=1e-5)
    seen = []
    head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: seen.append(x.shape[-2]) or head(x))
    bench.bench(model, batches=(1,), prompt_tokens=12, new_tokens=2, repeats=1)
    assert seen and set(seen) == {1}  # the prompt's head ran on its last position, as each step's does
