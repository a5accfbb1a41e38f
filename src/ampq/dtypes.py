"""Names of the float dtypes that users and checkpoints write, and the torch dtype of each."""

from __future__ import annotations

import torch

from ampq.errors import AmpqError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise AmpqError(f"unknown dtype {name!r}; use one of float32, bfloat16, float16") from None
