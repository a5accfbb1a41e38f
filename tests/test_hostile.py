"""Checkpoints from strangers: every damaged or malicious variant ends in ampq's own one-line error
(or, when the change is harmless, a model), never a crash, a hang or a huge allocation.

The mutations re-seal the manifest's file hashes, as an attacker would, so that they reach the
parsers behind the hash check: the safetensors header, the manifest's structure, config.json.
"""

import hashlib
import json
import resource
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ampq
from ampq import AmpqError
from ampq.io.checkpoint import MANIFEST, verify_checkpoint
from test_model_io import tiny_llama

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
PEAK_LIMIT = 1 << 30  # a hostile file must not make the loader allocate a GiB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile") / "ck"
    model = ampq.quantize(tiny_llama(), "int4-g32", progress=False)
    ampq.save(model, d)
    return d


def copy_of(pristine: Path, tmp: Path) -> Path:
    d = tmp / "ck"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(pristine, d)
    return d


def reseal(d: Path) -> None:
    """Make the manifest's file table agree with whatever the files now hold."""
    manifest = json.loads((d / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        data = (d / name).read_bytes()
        info.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    (d / MANIFEST).write_text(json.dumps(manifest))


def outcome(d: Path) -> str:
    """'ok' or 'refused'; anything but AmpqError fails the test, as does a big allocation."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    try:
        verify_checkpoint(d)
        ampq.load(d)
        result = "ok"
    except AmpqError as e:
        assert "\n" not in str(e) and str(e), repr(e)
        result = "refused"
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    assert grown < PEAK_LIMIT, f"loading grew the peak memory by {grown / 2**20:.0f} MiB"
    return result


def shard_of(d: Path) -> Path:
    return next(d.glob("*.safetensors"))


def split_shard(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def join_shard(path: Path, header: dict | bytes, body: bytes, declared: int | None = None) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob) if declared is None else declared) + blob + body)


@SETTINGS
@given(data=st.data())
def test_byte_level_damage_to_a_shard(pristine, tmp_path, data):
    d = copy_of(pristine, tmp_path)
    path = shard_of(d)
    raw = bytearray(path.read_bytes())
    kind = data.draw(st.sampled_from(["truncate", "flip", "flip-header", "insert"]))
    if kind == "truncate":
        raw = raw[:data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "insert":
        at = data.draw(st.integers(0, len(raw)))
        raw[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        header_len = struct.unpack("<Q", bytes(raw[:8]))[0] + 8
        hi = header_len - 1 if kind == "flip-header" else len(raw) - 1
        for at in data.draw(st.lists(st.integers(0, hi), min_size=1, max_size=8, unique=True)):
            raw[at] ^= data.draw(st.integers(1, 255))
    path.write_bytes(bytes(raw))
    if data.draw(st.booleans()):
        reseal(d)
    assert outcome(d) == "refused"


HUGE = st.sampled_from([2**31, 2**40, 2**62, 2**64 - 1, -1, -(2**40)])


@SETTINGS
@given(data=st.data())
def test_malicious_safetensors_headers(pristine, tmp_path, data):
    d = copy_of(pristine, tmp_path)
    path = shard_of(d)
    header, body = split_shard(path)
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    kind = data.draw(st.sampled_from(["offsets", "overlap", "dtype", "shape", "declared", "garbage", "nested"]))
    declared = None
    if kind == "offsets":
        header[name]["data_offsets"] = [data.draw(st.one_of(HUGE, st.integers(0, len(body) + 64))),
                                        data.draw(st.one_of(HUGE, st.integers(0, len(body) + 64)))]
    elif kind == "overlap":
        other = header[data.draw(st.sampled_from(names))]
        header[name]["data_offsets"] = list(other["data_offsets"])
    elif kind == "dtype":
        header[name]["dtype"] = data.draw(st.sampled_from(["F64", "I64", "BOOL", "F8_E5M2", "Q4", "", "U8 ", 7]))
    elif kind == "shape":
        header[name]["shape"] = data.draw(st.lists(st.one_of(HUGE, st.integers(0, 70)), max_size=4))
    elif kind == "declared":
        declared = data.draw(st.one_of(HUGE.filter(lambda v: v >= 0), st.integers(0, 4096)))
    elif kind == "garbage":
        header = data.draw(st.binary(max_size=200))
    else:
        header = b"[" * 100_000 + b"]" * 100_000
    join_shard(path, header, body, declared)
    reseal(d)
    assert outcome(d) in ("refused", "ok")  # some shape/dtype edits are self-consistent and harmless


def mutate_json(value, data, depth=0):
    """A copy of ``value`` with one node somewhere replaced by something hostile."""
    hostile = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                        st.text(max_size=20), st.just([10**12, 10**12]), st.just({}), st.just([]),
                        st.just("../../../etc/passwd"), st.just("int4-g0"), st.just("nf99-b64"))
    if isinstance(value, dict) and value and data.draw(st.integers(0, 3)) and depth < 6:
        key = data.draw(st.sampled_from(sorted(value)))
        if data.draw(st.integers(0, 4)) == 0:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: mutate_json(value[key], data, depth + 1)}
    if isinstance(value, list) and value and data.draw(st.integers(0, 3)) and depth < 6:
        i = data.draw(st.integers(0, len(value) - 1))
        return value[:i] + [mutate_json(value[i], data, depth + 1)] + value[i + 1:]
    return data.draw(hostile)


@SETTINGS
@given(data=st.data())
def test_hostile_manifests(pristine, tmp_path, data):
    d = copy_of(pristine, tmp_path)
    manifest = json.loads((d / MANIFEST).read_text())
    kind = data.draw(st.sampled_from(["mutate", "mutate", "mutate", "not-utf8", "nested", "huge-number"]))
    if kind == "mutate":
        # the part a loader trusts most: what each layer is and where its tensors are
        section = data.draw(st.sampled_from(["layers", "tensors", "files", None]))
        if section is None:
            manifest = mutate_json(manifest, data)
        else:
            manifest[section] = mutate_json(manifest[section], data)
        (d / MANIFEST).write_text(json.dumps(manifest))
    elif kind == "not-utf8":
        (d / MANIFEST).write_bytes(b'{"format": "\xff\xfe"}')
    elif kind == "nested":
        (d / MANIFEST).write_bytes(b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
    else:
        (d / MANIFEST).write_bytes(b'{"files": {"x": {"bytes": 1' + b"0" * 5000 + b'}}}')
    assert outcome(d) in ("refused", "ok")


@SETTINGS
@given(data=st.data())
def test_hostile_configs(pristine, tmp_path, data):
    """config.json decides what model is built before any tensor goes in: a config that asks for a
    billion layers or a huge width must be refused, not built."""
    d = copy_of(pristine, tmp_path)
    config = json.loads((d / "config.json").read_text())
    key = data.draw(st.sampled_from(["num_hidden_layers", "hidden_size", "intermediate_size", "vocab_size",
                                     "num_attention_heads", "num_key_value_heads", "model_type", "architectures",
                                     "max_position_embeddings", "tie_word_embeddings"]))
    config[key] = data.draw(st.one_of(st.sampled_from([0, -1, 10**9, 2**62, 3, None, "llama", "x", [], {}]),
                                      st.integers(-5, 500)))
    (d / "config.json").write_text(json.dumps(config))
    reseal(d)
    assert outcome(d) in ("refused", "ok")


def test_untouched_checkpoint_loads(pristine, tmp_path):
    assert outcome(copy_of(pristine, tmp_path)) == "ok"


def test_ampq_verify_checks_without_loading(pristine, tmp_path, capsys):
    from ampq.cli import main

    d = copy_of(pristine, tmp_path)
    assert main(["verify", str(d)]) == 0
    assert "verified" in capsys.readouterr().out
    # a layer whose table entry claims another format than its bytes hold: hashes alone cannot see it
    manifest = json.loads((d / MANIFEST).read_text())
    name = next(iter(manifest["layers"]))
    manifest["layers"][name]["format"] = "int8-ch"
    (d / MANIFEST).write_text(json.dumps(manifest))
    assert main(["verify", str(d)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"layer '{name}' in ampq.json does not match the stored tensors" in err and "\n" not in err
    with pytest.raises(AmpqError, match="does not match the stored tensors"):
        ampq.load(d)
    shard_of(d).write_bytes(b"\0" * 10)
    assert main(["verify", str(d)]) == 2
    assert "is truncated" in capsys.readouterr().err
