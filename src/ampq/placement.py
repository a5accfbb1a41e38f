"""Where a quantization run works: the device (CPU, one GPU, or this rank's GPU under
torch.distributed), which decoder block is on it, and the device memory each stage peaked at.

The model never has to fit on the device: its weights stay where they are (CPU memory, or their
files under ``--max-memory``); :meth:`Placement.onload` moves one block to the device just before
its work and back right after. Calibration activations stay on the device while they fit in a
share of its free memory (or of ``max_memory``), then go to pinned CPU memory, then to disk.
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ampq.errors import AmpqError
from ampq.memory import peak
from ampq.ranks import Ranks
from ampq.spill import ActivationStore

# of the device's free memory (or of --max-gpu-memory) what calibration activations may keep; the
# rest is for one block's weights, its Hessians and GPTQ's work
ACTIVATION_SHARE = 0.5


def parse_device(device: str | int | torch.device) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N``, a GPU index or ``auto`` (the GPU when there is one)."""
    if isinstance(device, int) or (isinstance(device, str) and device.strip().isdigit()):
        device = f"cuda:{int(device)}"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise AmpqError(f"unknown device {device!r}; give cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AmpqError(f"device {device} was asked for but this torch sees no GPU; pass --device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise AmpqError(f"device {device} does not exist: this machine has {torch.cuda.device_count()} GPUs")
    elif device.type != "cpu":
        raise AmpqError(f"device {device} is not supported; give cpu, cuda, cuda:N or auto")
    return device


def device_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes on a GPU; None on the CPU (``ampq.memory`` covers it)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)


@dataclass
class Placement:
    """The device of one run (and this process's rank); ``max_memory`` caps device memory."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    ranks: Ranks = field(default_factory=Ranks)
    max_memory: int | None = None
    peaks: dict[str, int] = field(default_factory=dict)  # stage -> peak bytes of device memory
    seconds: dict[str, float] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_memory is not None:
            if self.device.type != "cuda":
                raise AmpqError("--max-gpu-memory caps a GPU's memory; on the CPU use --max-memory")
            free, total = device_memory(self.device)
            if self.max_memory > total:
                raise AmpqError(f"--max-gpu-memory {self.max_memory / 1e9:.2f} GB is more than {self.device} has "
                                f"({total / 1e9:.2f} GB)")
            # the allocator refuses past the cap, as if the card were that small
            torch.cuda.set_per_process_memory_fraction(self.max_memory / total, self.device)

    @classmethod
    def of(cls, model: nn.Module) -> "Placement":
        """Work where the model is, in one process."""
        home = _home(model)  # a lazily loaded model's weights are still on the meta device
        return cls(home) if home is not None else cls()

    def to_device(self, obj):
        """``obj`` with every tensor in it (tuples, lists, dicts) on the device."""
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device, non_blocking=True)
        if isinstance(obj, tuple):
            return type(obj)(*(self.to_device(o) for o in obj)) if hasattr(obj, "_fields") else tuple(
                self.to_device(o) for o in obj)
        if isinstance(obj, list):
            return [self.to_device(o) for o in obj]
        if isinstance(obj, dict):
            return {k: self.to_device(v) for k, v in obj.items()}
        return obj

    @contextmanager
    def onload(self, module: nn.Module):
        """``module`` on the device for the work inside, then back where its weights were (what
        replaced its linears meanwhile goes back with it)."""
        home = _home(module)
        if home is None or home == self.device:
            yield module
            return
        module.to(self.device)
        try:
            yield module
        finally:
            module.to(home)

    def activation_store(self, host_limit: int | None = None, spill_dir=None) -> ActivationStore:
        """Where calibration activations go: on a GPU, a share of its free memory (within the
        cap), then pinned CPU memory up to ``host_limit``, then disk."""
        if self.device.type != "cuda":
            return ActivationStore(host_limit, spill_dir)
        free, _ = device_memory(self.device)
        if self.max_memory is not None:
            free = min(free, self.max_memory - torch.cuda.memory_allocated(self.device))
        return ActivationStore(host_limit, spill_dir, device=self.device,
                               device_limit=max(int(ACTIVATION_SHARE * free), 0))

    @contextmanager
    def stage(self, name: str):
        """Time a stage and keep the device memory it peaked at (the process's peak resident
        memory on the CPU, which only grows)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        started = time.perf_counter()
        try:
            yield
        except torch.OutOfMemoryError:
            cap = f" under --max-gpu-memory {self.max_memory / 1e9:.2f} GB" if self.max_memory else ""
            raise AmpqError(f"{self.device} ran out of memory during {name}{cap}; pass fewer --calib-windows or a "
                            "shorter --calib-window, or a device with more memory") from None
        finally:
            if cuda:
                torch.cuda.synchronize(self.device)
                self.peaks[name] = max(self.peaks.get(name, 0), torch.cuda.max_memory_allocated(self.device))
            else:
                self.peaks[name] = peak()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started

    def report(self) -> str:
        what = "device memory" if self.device.type == "cuda" else "resident memory (CPU, process peak so far)"
        where = f"{self.device}" + (f", rank {self.ranks.rank} of {self.ranks.world}" if self.ranks.world > 1 else "")
        stages = ", ".join(f"{k} {self.seconds[k]:.1f} s / {v / 1e9:.2f} GB" for k, v in self.peaks.items())
        return f"on {where}: time and peak {what} per stage: {stages}"

    def print_report(self, progress: bool) -> None:
        if progress and self.peaks:
            print(self.report(), file=sys.stderr)


def _home(module: nn.Module) -> torch.device | None:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.device.type != "meta":
            return t.device
    return None


def placement_for(model: nn.Module, device: str | torch.device | None = None,
                  devices: str | list | None = None, max_memory: int | None = None) -> Placement:
    """Where a run works: ``device`` (default: where the model is), or under torchrun / ``--devices``
    this rank's entry of ``devices`` (``"0,1"``, ``["cpu", "cpu"]``), or ``cuda:LOCAL_RANK`` when
    ``device`` is ``cuda``. Joins the other ranks (NCCL between GPUs, gloo on CPUs)."""
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if devices is not None:
        names = [d.strip() for d in devices.split(",")] if isinstance(devices, str) else list(devices)
        if local >= len(names):
            raise AmpqError(f"rank {local} has no device: --devices names {len(names)}; start as many ranks as devices")
        target = parse_device(names[local])
    elif device is not None:
        target = parse_device(device)
        if target.type == "cuda" and target.index is None:
            target = torch.device("cuda", local if int(os.environ.get("WORLD_SIZE", "1")) > 1 else
                                  torch.cuda.current_device())
    else:
        target = Placement.of(model).device
    if target.type == "cuda":
        torch.cuda.set_device(target)
    ranks = Ranks.from_environment("nccl" if target.type == "cuda" else "gloo")
    return Placement(target, ranks, max_memory)
