"""One rank of a test run under torchrun (or alone): quantize the tiny Llama of test_model_io to a
budget on the CPU and write the checkpoint to argv[1]. test_ranks.py compares 1, 2 and 3 ranks."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import ampq  # noqa: E402
from test_model_io import tiny_llama  # noqa: E402

CALIB = torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(5))
CANDS = ("int3-g64:rtn", "int4-g32:gptq", "int4-g64:gptq+clip", "int8-ch:rtn", "bf16")

if __name__ == "__main__":
    torch.set_num_threads(1)  # the same arithmetic in every process, whatever the rank count
    spec = ampq.Budget(bits=4.5, candidates=CANDS) if sys.argv[2] == "budget" else ampq.schemes.get_scheme("gptq")
    ampq.quantize(tiny_llama(), spec, calibration=CALIB, output=sys.argv[1], device="cpu",
                  bias_correction=sys.argv[2] != "budget", progress=False)
