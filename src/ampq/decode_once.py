"""Run quantized models on the reference kernel's arithmetic with each weight decoded once.

The reference kernel decodes a layer's whole weight on every call, which an evaluation over many
windows repeats for every batch. Within :func:`decoded_once`, each quantized linear keeps its
decoded weight for the rest of the block (held by :mod:`ampq.kernels` per thread, keyed by layer,
nothing stored on the layers) and drops it on exit. The products are the reference kernel's
exactly: the same decoded weight, the same dense matmul.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ampq import kernels
from ampq.memory import available_memory
from ampq.nn import QuantLinear

# what must stay free beside the decoded weights (one batch of logits and the allocator's slack)
HEADROOM_BYTES = 1 << 30


def decoded_bytes(models: Iterable[nn.Module]) -> int:
    """Bytes that the decoded weights of ``models``' quantized linears take in their compute dtype
    (each QuantLinear inside a nested layer counts: each is decoded on its own)."""
    total = 0
    for model in models:
        itemsize = max((t.element_size() for t in _tensors(model) if t.is_floating_point()), default=4)
        for m in model.modules():
            if isinstance(m, QuantLinear) and m.activation is None:  # quantized activations decode per call
                # a layer with its own compute dtype decodes in it: count the widest there is
                total += m.in_features * m.out_features * (4 if m.compute_dtype else itemsize)
    return total


def free_bytes(device: torch.device) -> int:
    """Bytes free now on ``device`` (host memory for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_memory()[0]


@contextlib.contextmanager
def decoded_once(models: Iterable[nn.Module], once: bool = True) -> Iterator[bool]:
    """Within the block, the quantized linears of ``models`` compute what the reference kernel
    computes, decoding each weight once where the decoded weights fit in free memory (else, and with
    ``once=False``, on every call, as the reference kernel does). Yields whether they decode once."""
    if once:
        need: dict[torch.device, int] = {}
        for model in models:
            device = next(_tensors(model)).device
            need[device] = need.get(device, 0) + decoded_bytes([model])
        short = [(d, n) for d, n in need.items() if n and free_bytes(d) < n + HEADROOM_BYTES]
        if short:
            once = False
            device, n = short[0]
            warnings.warn(f"decoding the quantized weights once would take {n / 2**30:.1f} GiB on {device}, more "
                          "than is free there: they are decoded on every call instead (slower, same figures)",
                          stacklevel=3)
    with kernels.use("reference"), (kernels.dequantized_weights_cached() if once else contextlib.nullcontext()):
        yield once


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
