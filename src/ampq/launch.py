"""``ampq quantize --devices 0,1``: start one rank per device with torch's elastic launcher (what
torchrun runs), each running the same command; the ranks find each other through the environment
the launcher sets (:func:`ampq.placement.placement_for`)."""

from __future__ import annotations

import os
import sys
import uuid

from ampq.errors import AmpqError


def launch(devices: list[str], argv: list[str]) -> None:
    """Run ``python -m ampq *argv`` once per device, as ranks of one torch.distributed job, and
    wait for all of them; a rank that fails ends the others (one line names it)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=len(devices), run_id=uuid.uuid4().hex,
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.5, start_method="spawn")
    # one thread per rank unless asked otherwise: the ranks share the machine's cores
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // len(devices))))
    try:
        elastic_launch(config, sys.executable)("-m", "ampq", *argv)
    except ChildFailedError as e:
        rank, failure = min(e.failures.items())
        raise AmpqError(f"rank {rank} of {len(devices)} failed (exit status {failure.exitcode}); its output above "
                        "says why") from None
