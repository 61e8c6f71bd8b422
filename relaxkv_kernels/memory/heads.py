"""Head parallelism: the ranks of a ``torch.distributed`` group, each holding ``num_heads / P`` of every head.

With Ulysses-style sequence parallelism the attention of each rank sees the whole sequence for its heads, so a
``KVCache`` splits by heads: rank r holds heads ``r * H / P .. (r + 1) * H / P - 1`` of every pool, window and
compressed block. What crosses ranks is only what a selection reads over all heads, so that every rank chooses
the same frames:

- Relax: the per-frame prototype (a mean over heads) is the mean of the ranks' means, one ``all_reduce`` of the
  chunk's new prototypes per chunk (:meth:`HeadShards.mean_`, in ``Planner.commit`` at ``end_chunk``, before the
  next scoring);
- Pack: the affinity reads the first H / 2 heads of the subsampled queries and of the blocks' mean keys; those
  are gathered along heads (:meth:`HeadShards.gather_heads`) at each layer's selection, so every rank runs the same
  ``mid_select`` on the same inputs as a single process would.

Collectives are ordinary ``torch.distributed`` calls (NCCL on GPUs, gloo on CPUs), issued in the same order on
every rank, with no host synchronisation, through :class:`relaxkv_kernels.distributed.RankGroup`.
"""
from __future__ import annotations

import torch

from ..distributed import RankGroup


class HeadShards(RankGroup):
    """``group``'s ranks (P of them), each holding ``num_heads / P`` consecutive heads (rank order).

    Attributes:
        group, size, rank: as :class:`RankGroup`. local_heads: H / P.
    """

    def __init__(self, op: str, group, num_heads: int):
        super().__init__(f"{op}: process_group", group)
        if num_heads % self.size:
            raise ValueError(f"{op}: num_heads {num_heads} is not divisible by the {self.size} ranks of process_group "
                             f"(each rank holds num_heads / P heads)")
        self.local_heads = num_heads // self.size

    def check_same(self, op: str, settings: dict[str, object]) -> None:
        """ValueError on every rank unless every rank passes equal ``settings`` (one ``all_gather_object``), naming
        the settings that differ and each rank's value: ranks with different caches would hang in a collective
        of one rank's policy that the others never make, or mix heads of different geometries."""
        import torch.distributed as dist

        every: list = [None] * self.size
        self.collective(f"{op} all_gather (settings of every rank)", dist.all_gather_object, every, settings)
        differ = [name for name in settings if any(other.get(name) != settings[name] for other in every)]
        if differ:
            values = "; ".join(f"{name}: " + ", ".join(f"rank {r} {other.get(name)!r}" for r, other in enumerate(every))
                               for name in differ)
            raise ValueError(f"{op}: process_group: every rank must make the same cache, but the ranks differ in "
                             f"{', '.join(differ)} ({values})")

    def gather_heads(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """Every rank's ``t`` (this rank's heads along ``dim``) concatenated in rank order: all H heads."""
        return self.gather(t, dim, "KVCache all_gather (heads)")

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (a mean over this rank's heads) becomes the mean over all heads, in place: the ranks' mean."""
        import torch.distributed as dist

        self.collective("KVCache all_reduce (prototypes)", dist.all_reduce, t)
        return t.div_(self.size)
