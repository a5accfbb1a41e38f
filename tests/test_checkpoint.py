import json
import hashlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import ampq.io.checkpoint as ckpt
from ampq import atomic
from ampq.errors import AmpqError
from ampq.io.checkpoint import read_checkpoint, verify_checkpoint, write_checkpoint


def make_tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "layer.0.weight": torch.randn(16, 8, generator=g),
        "layer.0.half": torch.randn(4, 4, generator=g).half(),
        "layer.0.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "layer.0.qweight": torch.randint(0, 256, (32,), generator=g, dtype=torch.uint8),
        "layer.0.idx": torch.randint(-1000, 1000, (2, 3), generator=g, dtype=torch.int32),
        "layer.0.fp8": torch.randn(8, 2, generator=g).to(torch.float8_e4m3fn),
    }


MANIFEST = {"format": "ampq", "version": 1, "bits": {"layer.0": 4}, "note": "héllo"}
EXTRA = {"config.json": b'{"hidden_size": 8}', "tokenizer.json": b'{"vocab": {}}'}


def assert_same(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        # float8 has no equality kernel everywhere; compare raw bytes, which is what must round-trip.
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k


def refusal(path, *needles):
    with pytest.raises(AmpqError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    with pytest.raises(AmpqError):
        verify_checkpoint(path)
    return msg


@pytest.fixture
def saved(tmp_path):
    d = tmp_path / "ck"
    write_checkpoint(d, make_tensors(), MANIFEST, EXTRA)
    return d


@pytest.fixture
def sharded(tmp_path):
    d = tmp_path / "sh"
    write_checkpoint(d, make_tensors(), MANIFEST, EXTRA, max_shard_bytes=64)
    return d


def load_manifest(d):
    return json.loads((d / "ampq.json").read_text())


def dump_manifest(d, m):
    (d / "ampq.json").write_text(json.dumps(m))


def test_round_trip(saved):
    t = make_tensors()
    got, manifest = read_checkpoint(saved)
    assert_same(t, got)
    assert all(v.device.type == "cpu" for v in got.values())
    assert sorted(p.name for p in saved.iterdir()) == ["ampq.json", "config.json", "model.safetensors", "tokenizer.json"]
    for name, data in EXTRA.items():
        assert (saved / name).read_bytes() == data
    assert verify_checkpoint(saved) == manifest


def test_manifest_keys_preserved(saved):
    _, m = read_checkpoint(saved)
    for k, v in MANIFEST.items():
        assert m[k] == v
    assert set(m["files"]) == {"model.safetensors", "config.json", "tokenizer.json"}
    e = m["tensors"]["layer.0.bf16"]
    assert e["file"] == "model.safetensors" and e["dtype"] == "bfloat16" and e["shape"] == [3, 5]
    assert m["files"]["config.json"]["sha256"] == hashlib.sha256(EXTRA["config.json"]).hexdigest()


def test_reserved_manifest_keys_rejected(tmp_path):
    for key in ("files", "tensors"):
        with pytest.raises(ValueError):
            write_checkpoint(tmp_path / key, make_tensors(), {key: 1})
        assert not (tmp_path / key).exists()


def test_sharding(sharded):
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) == 4
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    t = make_tensors()
    assert set(index["weight_map"]) == set(t)
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.numel() * v.element_size() for v in t.values())
    got, m = read_checkpoint(sharded)
    assert_same(t, got)
    assert "model.safetensors.index.json" in m["files"]


def test_oversized_tensor_gets_own_shard(tmp_path):
    t = {"a": torch.zeros(4), "big": torch.zeros(100), "c": torch.zeros(4)}
    write_checkpoint(tmp_path / "x", t, {}, max_shard_bytes=64)
    m = load_manifest(tmp_path / "x")
    assert len({e["file"] for e in m["tensors"].values()}) == 3


def test_shared_and_noncontiguous_tensors(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = {"base": base, "alias": base, "row": base[1], "t": base.t()}
    write_checkpoint(tmp_path / "x", t, {})
    got, _ = read_checkpoint(tmp_path / "x")
    for k in t:
        assert torch.equal(got[k], t[k])


def test_missing_shard(sharded):
    (sharded / "model-00002-of-00004.safetensors").unlink()
    refusal(sharded, "model-00002-of-00004.safetensors", "missing")


def test_truncated_shard(saved):
    p = saved / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[:81])
    refusal(saved, "model.safetensors", "truncated", f"81 of {len(data)} bytes")


def test_flipped_byte_in_shard_data(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-5] ^= 0x01  # well past the header, inside tensor data
    p.write_bytes(bytes(data))
    refusal(saved, "model.safetensors", "altered")


def test_flipped_byte_in_extra_file(saved):
    p = saved / "tokenizer.json"
    data = bytearray(p.read_bytes())
    data[3] ^= 0x20
    p.write_bytes(bytes(data))
    refusal(saved, "tokenizer.json", "altered")


def test_missing_extra_file(saved):
    (saved / "config.json").unlink()
    refusal(saved, "config.json", "missing")


def test_missing_manifest(saved):
    (saved / "ampq.json").unlink()
    refusal(saved, "ampq.json", "not an ampq checkpoint")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2]", b'{"files": 3}'])
def test_bad_manifest(saved, content):
    (saved / "ampq.json").write_bytes(content)
    refusal(saved, "ampq.json")


def test_altered_manifest_entry(saved):
    m = load_manifest(saved)
    m["tensors"]["layer.0.weight"]["shape"] = [8, 16]
    dump_manifest(saved, m)
    refusal(saved, "layer.0.weight", "model.safetensors", "[8, 16]")


def test_manifest_tensor_not_in_shards(saved):
    m = load_manifest(saved)
    m["tensors"]["ghost"] = dict(m["tensors"]["layer.0.weight"])
    dump_manifest(saved, m)
    refusal(saved, "'ghost'", "model.safetensors", "does not contain")


def test_shard_tensor_not_in_manifest(saved):
    m = load_manifest(saved)
    del m["tensors"]["layer.0.idx"]
    dump_manifest(saved, m)
    refusal(saved, "'layer.0.idx'", "model.safetensors")


def _replace_shard(d, shard, tensors, raw=None):
    p = d / shard
    if raw is None:
        save_file(tensors, str(p), metadata={"format": "pt"})
    else:
        p.write_bytes(raw)
    m = load_manifest(d)
    m["files"][shard] = {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
    dump_manifest(d, m)


def test_tensor_hash_mismatch(saved):
    t = make_tensors()
    t["layer.0.half"] = t["layer.0.half"] + 1  # same dtype and shape, different data
    _replace_shard(saved, "model.safetensors", t)
    refusal(saved, "'layer.0.half'", "model.safetensors", "SHA-256")


def test_shard_not_safetensors(saved):
    _replace_shard(saved, "model.safetensors", None, raw=b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header!!}")
    refusal(saved, "model.safetensors", "not a valid safetensors")


def test_nonexistent_directory(tmp_path):
    refusal(tmp_path / "nope", "nope", "does not exist")


def test_existing_dir_needs_overwrite(saved):
    with pytest.raises(AmpqError) as info:
        write_checkpoint(saved, {"x": torch.ones(2)}, {"v": 2})
    assert str(saved) in str(info.value) and "overwrite=True" in str(info.value)
    assert_same(make_tensors(), read_checkpoint(saved)[0])

    write_checkpoint(saved, {"x": torch.ones(2)}, {"v": 2}, overwrite=True)
    got, m = read_checkpoint(saved)
    assert list(got) == ["x"] and m["v"] == 2
    assert not (saved / "config.json").exists()
    assert [p.name for p in saved.parent.iterdir()] == ["ck"]  # no temp or old dirs left behind


def test_empty_existing_dir_is_fine(tmp_path):
    (tmp_path / "e").mkdir()
    write_checkpoint(tmp_path / "e", {"x": torch.ones(2)}, {})
    assert list(read_checkpoint(tmp_path / "e")[0]) == ["x"]


def _crash_on_second_shard(monkeypatch):
    calls = []
    real = ckpt.safetensors_file.write

    def flaky(path, tensors, metadata=None):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("simulated crash")
        return real(path, tensors, metadata)

    monkeypatch.setattr(ckpt.safetensors_file, "write", flaky)
    return calls


def test_crash_mid_write_leaves_nothing(tmp_path, monkeypatch):
    calls = _crash_on_second_shard(monkeypatch)
    d = tmp_path / "new"
    with pytest.raises(OSError, match="simulated crash"):
        write_checkpoint(d, make_tensors(), MANIFEST, EXTRA, max_shard_bytes=64)
    assert len(calls) == 2
    assert not d.exists()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(AmpqError):
        read_checkpoint(d)


def test_crash_mid_overwrite_keeps_old(saved, monkeypatch):
    _crash_on_second_shard(monkeypatch)
    with pytest.raises(OSError):
        write_checkpoint(saved, make_tensors(seed=1), {"v": 2}, max_shard_bytes=64, overwrite=True)
    got, m = read_checkpoint(saved)
    assert_same(make_tensors(), got)
    assert m["note"] == MANIFEST["note"]


def test_leftover_temp_dir_is_not_a_checkpoint(tmp_path, monkeypatch):
    # A hard kill cannot run cleanup; emulate that by making the cleanup a no-op.
    _crash_on_second_shard(monkeypatch)
    monkeypatch.setattr(atomic.shutil, "rmtree", lambda *a, **k: None)
    d = tmp_path / "new"
    with pytest.raises(OSError):
        write_checkpoint(d, make_tensors(), MANIFEST, max_shard_bytes=64)
    leftovers = list(tmp_path.iterdir())
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".new.tmp-")
    assert not d.exists()
    refusal(leftovers[0], "not an ampq checkpoint")


def test_failed_final_rename_restores_old(saved, monkeypatch):
    real = atomic.os.rename

    def rename(src, dst):
        if ".tmp-" in Path(src).name:
            raise OSError("simulated crash at swap")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="swap"):
        write_checkpoint(saved, {"x": torch.ones(2)}, {"v": 2}, overwrite=True)
    assert_same(make_tensors(), read_checkpoint(saved)[0])
    assert [p.name for p in saved.parent.iterdir()] == ["ck"]
