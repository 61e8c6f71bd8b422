"""Collectives over the ranks of a ``torch.distributed`` group, their failures named.

    RankGroup        the ranks of an initialised group and this process's place in it; its collectives fail as one
                     :class:`CollectiveError` naming the rank and the call
    run_collective   one collective call, its failure as a :class:`CollectiveError`
    CollectiveError  a collective failed on this rank (typically: another rank stopped)

``KVCache``'s head parallelism (``relaxkv_kernels.memory.heads``) builds on them, and so can a caller's own
parallel code (``relaxkv_gen.parallel``). ``torch.distributed`` is imported only when a group is used.
"""
from __future__ import annotations

import torch


class CollectiveError(RuntimeError):
    """A collective failed on this rank (typically: another rank stopped, which closes its connections)."""


def run_collective(rank: int, size: int, name: str, run) -> None:
    """``run()``, a collective call; its failure as one :class:`CollectiveError` naming this rank and ``name``
    instead of the backend's message alone."""
    try:
        run()
    except CollectiveError:
        raise
    except RuntimeError as exc:  # gloo: "Connection closed by peer"; NCCL: the watchdog's timeout
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CollectiveError(f"rank {rank} of {size}: {name} failed (another rank stopped?): {detail}") from exc


class RankGroup:
    """The ranks of an initialised ``torch.distributed`` group (P of them) and this process's place in it.

    Attributes:
        group: the process group. size: P. rank: this rank in ``group``.
    """

    def __init__(self, what: str, group):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{what}: torch.distributed is not initialised (init_process_group first, e.g. under "
                             "torchrun)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def collective(self, name: str, fn, *args) -> None:
        """``fn(*args, group=self.group)``, a ``torch.distributed`` call, through :func:`run_collective`."""
        run_collective(self.rank, self.size, name, lambda: fn(*args, group=self.group))

    def gather(self, t: torch.Tensor, dim: int, name: str) -> torch.Tensor:
        """Every rank's ``t`` concatenated along ``dim`` in rank order, on every rank."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.size)]
        self.collective(name, dist.all_gather, parts, t.contiguous())
        return torch.cat(parts, dim=dim)
