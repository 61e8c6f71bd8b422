"""Head parallelism: the ranks of a ``torch.distributed`` group, each holding ``num_heads / P`` of every head.

With Ulysses-style sequence parallelism the attention of each rank sees the whole sequence for its heads, so a
``KVCache`` splits by heads: rank r holds heads ``r * H / P .. (r + 1) * H / P - 1`` of every pool, window and
compressed block. What crosses ranks is only what a selection reads over all heads, so that every rank chooses
the same frames:

- Relax: the per-frame prototype (a mean over heads) is the mean of the ranks' means, one ``all_reduce`` of the
  chunk's new prototypes per chunk (:meth:`HeadShards.mean_`, at ``end_chunk``, before the next scoring);
- Pack: the affinity reads the first H / 2 heads of the subsampled queries and of the blocks' mean keys; those
  are gathered along heads (:meth:`HeadShards.gather`) at each layer's selection, so every rank runs the same
  ``mid_select`` on the same inputs as a single process would.

Collectives are ordinary ``torch.distributed`` calls (NCCL on GPUs, gloo on CPUs), issued in the same order on
every rank, with no host synchronisation.
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


class HeadShards:
    """``group``'s ranks (P of them) and the heads this rank holds.

    Attributes:
        group: the process group. size: P. rank: this rank in ``group``.
        num_heads: H (all ranks). local_heads: H / P. first_head: ``rank * H / P``.
    """

    def __init__(self, op: str, group, num_heads: int):
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"{op}: process_group: torch.distributed is not initialised "
                             "(init_process_group first, e.g. under torchrun)")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_heads % self.size:
            raise ValueError(f"{op}: num_heads {num_heads} is not divisible by the {self.size} ranks of process_group "
                             f"(each rank holds num_heads / P heads)")
        self.num_heads = num_heads
        self.local_heads = num_heads // self.size
        self.first_head = self.rank * self.local_heads

    def gather(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` (this rank's heads along ``dim``) concatenated in rank order: all H heads."""
        import torch.distributed as dist

        parts = [torch.empty_like(t) for _ in range(self.size)]
        run_collective(self.rank, self.size, "KVCache all_gather (heads)",
                       lambda: dist.all_gather(parts, t.contiguous(), group=self.group))
        return torch.cat(parts, dim=dim)

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a mean over this rank's heads) becomes the mean over all heads, in place: the ranks' mean."""
        import torch.distributed as dist

        run_collective(self.rank, self.size, "KVCache all_reduce (prototypes)",
                       lambda: dist.all_reduce(t, group=self.group))
        return t.div_(self.size)
