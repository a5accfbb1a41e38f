"""The machine a benchmark ran on, stated with every figure."""

from __future__ import annotations

import datetime
import os
import platform
import sys


def machine() -> dict:
    import torch

    from ampq.calibrate import autocast_dtype

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "memory_gib": round(mem, 1) if mem else None, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.date.today().isoformat(),
            # the dtype calibration's statistics passes multiplied in (float32 before 2026-12-07)
            "calibration_dtype": str(autocast_dtype("cuda" if torch.cuda.is_available() else "cpu") or "float32").removeprefix("torch."),
            # how the run was started, so that a result can be remade from its own file
            "command": " ".join(["python", *sys.argv])}


def describe(m: dict) -> str:
    gpu = f", {m['gpu']}" if m.get("gpu") else ", no GPU"
    return f"{m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB{gpu}), torch {m['torch']}, {m['date']}"
