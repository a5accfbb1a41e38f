"""Peak resident memory and time of `ampq quantize` with and without `--max-memory`, each run a
separate process whose peak the kernel reports (wait4's ru_maxrss, via ampq.memory.run_measured),
one after the other.

    python benchmarks/memory_cap.py [--model qwen2.5-coder-0.5b] [--cap 1.5GB] [--windows 16]
                                    [--spill-windows 128] [--runs free,capped,spill]

Runs: no cap; the cap; the cap with --spill-windows calibration windows (more activations than fit
beside the work, so part of them go to disk). Checks that the capped outputs are byte for byte the
uncapped one's where the arguments agree. Prints a table and writes benchmarks/results/memory_cap/memory_cap.json
(runs left out with --runs keep their earlier results there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _machine import describe, machine  # noqa: E402

from ampq.builtin import fetch_model  # noqa: E402
from ampq.memory import run_measured  # noqa: E402
from ampq.report import print_table  # noqa: E402


def run(args: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "ampq", "quantize", *args, "-o", str(out)]
    log = out.with_suffix(".log")
    t0 = time.perf_counter()
    code, peak = run_measured(cmd, log, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    seconds = time.perf_counter() - t0
    text = log.read_text()
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{text[-2000:]}")
    return {"args": args, "peak_bytes": peak, "seconds": round(seconds, 1),
            "spilled": "went to disk" in text, "log_tail": text.strip().splitlines()[-3:]}


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--cap", default="1.5GB")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--spill-windows", type=int, default=128)
    ap.add_argument("--scheme", default="gptq")
    ap.add_argument("--spill-cap", default=None, help="the cap of the spill run (default --cap)")
    ap.add_argument("--runs", default="free,capped,spill")
    a = ap.parse_args()
    source = fetch_model(a.model) if not Path(a.model).exists() else Path(a.model)
    size = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    base = [a.model, "--dtype", "float32", "-s", a.scheme]
    configs = {"free": ("no cap", ["--calib-windows", str(a.windows)]),
               "capped": (f"--max-memory {a.cap}", ["--calib-windows", str(a.windows), "--max-memory", a.cap]),
               "spill": (f"--max-memory {a.spill_cap or a.cap}, {a.spill_windows} windows",
                         ["--calib-windows", str(a.spill_windows), "--max-memory", a.spill_cap or a.cap])}
    path = Path(__file__).parent / "results" / "memory_cap" / "memory_cap.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results = {r["name"]: r for r in saved.get("runs", []) if "name" in r}
    work = Path(tempfile.mkdtemp(prefix="ampq-memcap-", dir=Path.cwd()))
    same = saved.get("capped_identical_to_uncapped")
    try:
        for name in a.runs.split(","):
            label, extra = configs[name]
            r = run(base + extra, work / name)
            results[name] = {"name": name, "label": label, **r, "machine": machine()}
            print(f"{label}: peak {r['peak_bytes'] / 1e9:.2f} GB, {r['seconds']:.0f} s", file=sys.stderr)
            if (work / "free").exists() and (work / "capped").exists():
                same = files(work / "free") == files(work / "capped")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"machine": machine(), "model": a.model, "weights_bytes": size, "cap": a.cap,
                                        "scheme": a.scheme, "capped_identical_to_uncapped": same,
                                        "runs": list(results.values())}, indent=2))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    m = machine()
    rows = [[r["label"], f"{r['peak_bytes'] / 1e9:.2f} GB", f"{r['seconds']:.0f} s", "yes" if r["spilled"] else "no"]
            for r in (results[n] for n in configs if n in results)]
    print_table(f"ampq quantize {a.model} in float32 ({size / 1e9:.2f} GB of weights), {a.scheme}",
                ["run", "peak resident memory", "wall time", "activations spilled"], rows,
                f"{describe(m)}; capped output byte-identical to the uncapped one: {same}")


if __name__ == "__main__":
    main()
