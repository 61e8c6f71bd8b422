"""Head parallelism: the ranks of a ``torch.distributed`` group, each holding ``num_heads / P`` of every head.

With Ulysses-style sequence parallelism the attention of each rank sees the whole sequence for its heads, so a
``KVCache`` splits by heads: rank r holds heads ``r * H / P .. (r + 1) * H / P - 1`` of every pool, window and
compressed block. What crosses ranks is only what a selection reads over all heads, so that every rank chooses
the same frames:

- Relax: the per-frame prototype (a mean over heads) is the mean of the ranks' means, one ``all_reduce`` of the
  chunk's new prototypes per chunk (:meth:`HeadShards.mean_`, at ``end_chunk``, before the next scoring);
- Pack: the affinity reads the first H / 2 heads of the subsampled queries and of the blocks' mean keys; those
  are gathered along heads (:meth:`HeadShards.gather_heads`) at each layer's selection, so every rank runs the same
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
