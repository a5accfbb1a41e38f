"""Several processes on one run, through torch.distributed: which calibration batches and which
linears each rank takes, and the collectives that put the pieces together.

The result must not depend on how many ranks there are. Calibration batch ``b`` goes to rank
``b % world``; statistics are summed one batch at a time in batch order on every rank (each round
gathers the next ``world`` batches' partial sums, in a fixed order), so 1, 2 or 3 ranks add the
same numbers in the same order. A linear is quantized by one rank and its result sent to all.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

from ampq.errors import AmpqError

# a rank that died makes the others fail here instead of waiting for ever
TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("AMPQ_RANK_TIMEOUT", "600")))


class Ranks:
    """This process's place among ``world`` ranks (one rank and no collectives by default)."""

    def __init__(self, rank: int = 0, world: int = 1):
        self.rank, self.world = rank, world

    @property
    def main(self) -> bool:
        """The rank that writes files and prints progress."""
        return self.rank == 0

    @classmethod
    def from_environment(cls, backend: str) -> "Ranks":
        """The ranks torchrun (or :func:`ampq.launch.launch`) started, read from its environment;
        one rank where there is none. Joins the process group on first use."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        if not dist.is_initialized():
            try:
                dist.init_process_group(backend, timeout=TIMEOUT)
            except (RuntimeError, ValueError) as e:
                raise AmpqError(f"could not join the other ranks ({' '.join(str(e).split())[:160]}); start the run "
                                "with torchrun or --devices") from None
        return cls(dist.get_rank(), dist.get_world_size())

    def batches(self, count: int) -> list[int]:
        """The calibration batches (of ``count``) this rank runs."""
        if count < self.world:
            raise AmpqError(f"{count} calibration batches cannot feed {self.world} ranks; give more calibration "
                            f"windows or fewer ranks")
        return list(range(self.rank, count, self.world))

    def rounds(self, count: int) -> int:
        return -(-count // self.world)

    def fold(self, totals: Sequence[torch.Tensor], partials: Sequence[torch.Tensor] | None) -> None:
        """Add one round's partial sums into ``totals`` in batch order: this rank's (None when it has
        no batch in this round) and every other rank's, rank by rank."""
        if self.world == 1:
            if partials is not None:
                for t, p in zip(totals, partials):
                    t.add_(p)
            return
        for t, p in zip(totals, partials if partials is not None else [None] * len(totals)):
            mine = p if p is not None else torch.zeros_like(t)
            parts = [torch.empty_like(t) for _ in range(self.world)]
            self._collective(dist.all_gather, parts, mine.contiguous())
            for q in parts:  # adding a rank's zeros (no batch) leaves every bit as it was
                t.add_(q)

    def fold_max(self, totals: Sequence[torch.Tensor]) -> None:
        """Elementwise maxima over ranks (exact in any order)."""
        if self.world > 1:
            for t in totals:
                self._collective(dist.all_reduce, t, op=dist.ReduceOp.MAX)

    def owners(self, costs: Sequence[float]) -> list[int]:
        """A rank for each job, the costliest first to the least loaded rank, so the ranks finish
        together (ties go to the lower job and rank: every rank computes the same answer)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
            r = min(range(self.world), key=lambda k: (load[k], k))
            owner[job] = r
            load[r] += costs[job]
        return owner

    def share(self, obj, owner: int):
        """``obj`` as rank ``owner`` has it, on every rank (tensors travel on the CPU)."""
        if self.world == 1:
            return obj
        box = [obj if self.rank == owner else None]
        self._collective(dist.broadcast_object_list, box, src=owner)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        self._collective(dist.all_gather_object, out, obj)
        return out

    def owned(self, costs: dict[str, float]) -> dict[str, int]:
        """:meth:`owners` of named jobs."""
        return dict(zip(costs, self.owners(list(costs.values()))))

    def barrier(self) -> None:
        if self.world > 1:
            self._collective(dist.barrier)

    def _collective(self, collective, *args, **kwargs):
        try:
            return collective(*args, **kwargs)
        except (RuntimeError, dist.DistBackendError) as e:
            raise AmpqError(f"rank {self.rank}: another rank stopped answering ({' '.join(str(e).split())[:160]}); "
                            "its own error says why; the same command resumes from the last finished block") from None


def owned_linears(block: nn.Module, groups: list[list[str]], ranks: Ranks) -> dict[str, int]:
    """The rank that handles each linear of ``block`` (by name within it), balanced by weight size."""
    return ranks.owned({sub: float(block.get_submodule(sub).weight.numel()) for g in groups for sub in g})


def merge_by_name(ranks: Ranks, names: list[str], owners, tables: list[dict]) -> None:
    """Fill each of ``tables`` (dicts keyed by layer name, each layer's entry written by the rank
    that owns it) with every rank's entries for ``names``, in the order of ``names``: the dicts end
    up as one process would have filled them."""
    owners = list(owners)
    mine = [{n: t[n] for n in names if n in t} for t in tables]
    everyone = ranks.gather(mine)
    for k, table in enumerate(tables):
        for n in names:
            table.pop(n, None)
        for n, owner in zip(names, owners):
            if n in everyone[owner][k]:
                table[n] = everyone[owner][k][n]
