"""Memory: what the process holds (resident, peak), what the system could still give it
(:func:`available_memory`, the one free-memory probe), and a cap on resident memory with what a
quantization run may keep within it.

Resident memory is what the operating system counts (``/proc/self/status``); the cap is checked
against it, so it covers Python, torch, the tokenizer and the allocator's slack, not only tensors.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import resource
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil
from torch import nn

from ampq.errors import AmpqError

_CGROUP = Path("/sys/fs/cgroup")


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def resident() -> int:
    """Bytes of memory the process holds now."""
    kib = _status_kib("VmRSS")
    return kib * 1024 if kib is not None else peak()


def peak() -> int:
    """The most bytes of memory the process has held at once."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def available_memory() -> tuple[int, int]:
    """(available, total) bytes of memory for this process: the machine's, or its container's
    where a cgroup limit is lower (psutil sees only the machine)."""
    mem = psutil.virtual_memory()
    available, total = mem.available, mem.total
    limited = _cgroup_memory()
    if limited is not None and limited[1] < total:
        available, total = min(available, limited[0]), limited[1]
    return available, total


def _cgroup_memory() -> tuple[int, int] | None:
    """(available, limit) under the cgroup's memory limit (v2, else v1), None without one. The
    inactive page cache counts as available, as the kernel reclaims it before refusing memory."""
    for limit_file, usage_file, cache_key in (("memory.max", "memory.current", "inactive_file"),
                                              ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes",
                                               "total_inactive_file")):
        try:
            limit = (_CGROUP / limit_file).read_text().strip()
            if not limit.isdigit():
                return None  # "max": no limit
            usage = int((_CGROUP / usage_file).read_text())
            stat = (_CGROUP / limit_file).with_name("memory.stat").read_text().split()
        except (OSError, ValueError):
            continue
        cache = dict(zip(stat[::2], stat[1::2])).get(cache_key, "0")
        return max(int(limit) - usage + int(cache), 0), int(limit)
    return None


_LIBC = None


def _libc():
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # glibc only  # noqa: B018
        except (OSError, AttributeError):
            _LIBC = False
    return _LIBC


def return_freed_memory() -> None:
    """Hand memory that was freed back to the system (glibc keeps it for reuse otherwise)."""
    libc = _libc()
    if libc:
        libc.malloc_trim(0)


def fixed_mmap_threshold() -> None:
    # glibc raises its mmap threshold after large frees, after which big tensors come from the heap
    # and their memory stays with the process after they are freed; a fixed threshold keeps every
    # large tensor in its own mapping, returned to the system the moment it is freed
    libc = _libc()
    if libc:
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD = 1 MiB


@dataclass
class MemoryCap:
    """``limit`` bytes of resident memory for one run; activations that do not fit go to a
    hidden folder in ``spill_dir`` (beside the output: a disk, not a RAM-backed /tmp).
    ``activations``, when set, caps the calibration activations kept in memory further."""

    limit: int
    spill_dir: Path | None = None
    activations: int | None = None
    spilled: int = 0  # activation batches written to disk, reported at the end

    def __post_init__(self):
        fixed_mmap_threshold()

    def allowance(self, need: int, what: str) -> int:
        """What is left for calibration activations once ``need`` more bytes are kept for the work
        itself; fails, naming the least cap that could work, when nothing is left."""
        free = self.limit - resident() - need
        if free < 0:
            least = resident() + need
            raise AmpqError(f"--max-memory {_gb(self.limit)} is below what {what} needs ({_gb(least)} with "
                            f"{_gb(resident())} already in use); give at least {_gb(least * 1.1)}")
        return free

    def report(self) -> str:
        text = f"peak resident memory {_gb(peak())} of the {_gb(self.limit)} cap"
        if self.spilled:
            text += f"; {self.spilled} calibration batch outputs went to disk (they did not fit beside the work)"
        return text


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _tensor_bytes(module: nn.Module, dtype_bytes: int | None = None) -> int:
    return sum(math.prod(t.shape) * (dtype_bytes or t.dtype.itemsize)
               for t in list(module.parameters()) + list(module.buffers()))


def working_set(model: nn.Module, blocks: list[tuple[str, nn.Module]], batch: int, window: int, outside: int,
                quantized: int, head: int = 0) -> int:
    """Bytes a block-by-block quantization needs beside the calibration activations: the largest of
    the capture (the embeddings and whatever else runs before the first block, ``outside``), one
    block's work (its float weights twice, as read and as dequantized for the passes, the largest
    Hessian with GPTQ's factor and inverse, one batch's intermediate activations) and the output
    head's (``head``: its float bytes, when it is quantized too), plus the ``quantized`` bytes all
    finished blocks keep and two batches of spill traffic."""
    block = max(blocks, key=lambda b: _tensor_bytes(b[1]))[1]
    linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
    widest_in = max((m.in_features for m in linears), default=0)
    widest_out = max((m.out_features for m in linears), default=0)
    hidden = min((m.in_features for m in linears), default=0)
    config = getattr(model, "config", None)
    heads = getattr(config, "num_attention_heads", 1) or 1
    batch_tokens = batch * window
    hessian = 3 * 4 * widest_in * widest_in
    # one batch through the block: the MLP's wide intermediates, a few hidden-width tensors (residual,
    # norm, attention), and the attention scores if the attention materialises them
    activations = 4 * batch_tokens * (3 * widest_out + 6 * hidden) + 4 * batch_tokens * heads * window
    work = 2 * _tensor_bytes(block, 4) + max(hessian, activations)
    io = 2 * 4 * batch_tokens * hidden  # a spilled batch read back while the one before is written
    # 10% for what the estimate leaves out (allocator slack, small temporaries): without it a run on
    # Qwen2.5-0.5B whose activations filled their allowance peaked 10 MB over a 1.5 GB cap
    return int(1.1 * (max(outside + 4 * batch_tokens * hidden, work, 3 * head) + quantized + io))


# A small Python process that runs the command as its child and reports the child's peak: a child
# forked straight from a big process (pytest, a benchmark that loaded a model) starts with the
# parent's resident pages counted in its peak, which would overstate it by the parent's size.
_LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:], stdout=sys.stdout, stderr=sys.stderr)
_, status, usage = os.wait4(proc.pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)))
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_measured(cmd: list[str], log: Path, env: dict | None = None) -> tuple[int, int]:
    """Run ``cmd`` with its output in ``log``; (exit status, the peak resident bytes the kernel
    counted for it)."""
    report = log.with_name(log.name + ".peak")
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, "-c", _LAUNCHER, str(report), *cmd], stdout=f,
                              stderr=subprocess.STDOUT, env=env).returncode
    peak_bytes = int(report.read_text()) if report.exists() else 0
    report.unlink(missing_ok=True)
    return code, peak_bytes
