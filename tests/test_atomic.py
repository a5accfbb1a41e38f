"""ampq.atomic: a file or folder is replaced whole or not at all, and no temporary stays behind."""

import os

import pytest

from ampq import atomic
from ampq.atomic import atomic_file, atomic_folder


def test_write_bytes_and_text_replace_the_file(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    assert atomic.write_text(path, "new ü") == path
    assert path.read_text(encoding="utf-8") == "new ü"
    atomic.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.bin"]


@pytest.mark.parametrize("durable", [True, False])
def test_a_failure_mid_write_keeps_the_old_file_and_no_temporary(tmp_path, durable):
    path = tmp_path / "plan.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="mid-write"):
        with atomic_file(path, durable=durable) as tmp:
            assert tmp.parent == tmp_path and tmp.name.startswith(".plan.json.tmp-")
            tmp.write_text("half of the new")
            raise RuntimeError("mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_failure_before_anything_is_written_leaves_no_file(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "new.bin"):
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "x.txt"
    path.write_text("old")

    def replace(src, dst):
        raise OSError("simulated crash at rename")

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename"):
        atomic.write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_temporary_names_are_hidden_siblings_and_unique(tmp_path):
    a, b = atomic.temporary_name(tmp_path / "m.gguf"), atomic.temporary_name(tmp_path / "m.gguf")
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith(f".m.gguf.tmp-{os.getpid()}-")


def test_folder_is_replaced_whole(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_folder(out) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.txt").write_text("a")
        (tmp / "b.txt").write_text("b")
        assert not (out / "b.txt").exists()  # nothing shows before the block ends
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == ["b.txt", "sub", "sub/a.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failure_mid_write_keeps_the_old_folder_and_no_temporary(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("mid-write")
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_failed_folder_rename_puts_the_old_one_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = os.rename

    def rename(src, dst):
        if ".tmp-" in os.path.basename(src):
            raise OSError("simulated crash at swap")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(OSError, match="swap"):
        with atomic_folder(out) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (out / "old.txt").read_text() == "old" and not (out / "new.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_an_empty_folder_in_the_way_is_replaced(tmp_path):
    (tmp_path / "out").mkdir()
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "a").write_text("a")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["a"]
