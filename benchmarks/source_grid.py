"""How close a model's weights sit to a quantization grid: re-quantize some of its tensors with
gguf-py's own quantizers (llama.cpp's rules) and with ampq's formats, and report how far each moves
them (mean |change| over mean |weight|, and the share of weights left exactly as they were).

    python benchmarks/source_grid.py --gguf /tmp/ampq-vs-llama-cpp/qwen2.5-coder-0.5b/f16.gguf

The F16 GGUF is the one `benchmarks/vs_llama_cpp.py` writes first. A model decoded from a quantized
file (the built-in ones) comes back almost unchanged from the type it was stored in, which flatters
that type in any comparison; this shows which. Writes benchmarks/results/source_grid/source_grid.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import machine  # noqa: E402

from ampq.formats import get_format  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "source_grid"
TYPES = ("Q5_0", "Q8_0", "Q4_0")
FORMATS = ("int5-g32-sym", "int8-g32-sym", "int4-g32-sym")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--tensors", default="blk.3.attn_q.weight,blk.3.ffn_up.weight,blk.3.ffn_down.weight")
    p.add_argument("--rows", type=int, default=2048, help="rows of each tensor to re-quantize")
    args = p.parse_args()
    wanted = args.tensors.split(",")
    rows = []
    for t in gguf.GGUFReader(str(args.gguf)).tensors:
        if t.name not in wanted:
            continue
        w = np.array(t.data, dtype=np.float32).reshape(-1, int(t.shape[0]))[: args.rows]
        scale = float(np.abs(w).mean())
        for kind in TYPES:
            q = gguf.GGMLQuantizationType[kind]
            d = gguf.quants.dequantize(gguf.quants.quantize(w, q), q).reshape(w.shape)
            rows.append({"tensor": t.name, "by": f"gguf-py {kind}", "relative_change": float(np.abs(d - w).mean()) / scale,
                         "unchanged": float((d == w).mean())})
        for name in FORMATS:
            d = get_format(name).fake_quantize(torch.from_numpy(w)).numpy()
            rows.append({"tensor": t.name, "by": f"ampq {name}", "relative_change": float(np.abs(d - w).mean()) / scale,
                         "unchanged": float((d == w).mean())})
    for r in rows:
        print(f"{r['tensor']:24} {r['by']:20} change {r['relative_change']:.2e}  unchanged {r['unchanged']:.3f}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "source_grid.json").write_text(json.dumps(
        {"machine": machine(), "command": "python benchmarks/source_grid.py " + " ".join(sys.argv[1:]), "rows": rows},
        indent=1))


if __name__ == "__main__":
    main()
