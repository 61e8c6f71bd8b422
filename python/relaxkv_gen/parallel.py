"""Ulysses sequence parallelism for the reference generator: tokens split across ranks, heads inside attention.

Every rank of a ``torch.distributed`` group of P ranks gets the same full chunk, keeps its contiguous
range of S / P of the chunk's S = U * F tokens for everything outside self-attention (modulation,
cross-attention, FFN, head), and trades tokens for heads around the KV memory::

    q, k, v [B, S/P, H, D]  --all-to-all-->  [B, S, H/P, D]   (every token, this rank's heads)
    cache.attend(layer, q, k, v)              # a head-parallel KVCache: rank r holds heads r*H/P ..
    out [B, S, H/P, D]      --all-to-all-->  [B, S/P, H, D]

and the head's output is gathered so every rank returns the whole flow (the sampler runs identically on every
rank).

Traffic per layer and pass: each rank sends (and receives) ``4 * B * (S/P) * H * D`` elements in two
all-to-alls (q, k, v in one call, the output in the other), ``(P - 1) / P`` of them to other ranks, so
``4 * B * S * H * D * (P - 1) / P**2 * itemsize`` bytes leave each rank (Wan2.1-1.3B, B = 1, S = 4680,
H * D = 1536, bf16, P = 2: 14.4 MB). Once per pass, the head's gather brings each rank
``B * S * (P - 1) / P * out_dim * prod(patch)`` elements (64 per token for Wan).

A collective that fails here (another rank raised and left, say) raises :class:`CollectiveError` naming this
rank. With gloo a peer's exit breaks the connection at once; NCCL waits for the process group's timeout unless
the launcher (torchrun) stops the other ranks.
"""
from __future__ import annotations

import math

import torch

from relaxkv_kernels import RankGroup

from .config import ModelConfig
from .protocols import AttendFn
from .protocols import Timer
from .protocols import timed

COMM_SECTION = "all_to_all"  # the timer section of the Ulysses all-to-alls


def tokens_per_rank(tokens: int, ranks: int) -> int:
    """S / P for a chunk of ``tokens`` = U * F tokens over ``ranks`` = P ranks; ValueError unless P divides S."""
    if tokens % ranks:
        raise ValueError(f"sequence parallel: the chunk's {tokens} tokens (U * F) are not divisible by the {ranks} "
                         f"ranks (each rank takes tokens / P of them): use a number of ranks dividing {tokens}")
    return tokens // ranks


def check_ranks(cfg: ModelConfig, chunk_frames: int, ranks: int) -> None:
    """ValueError unless ``ranks`` = P divides the model's heads and the tokens of a chunk of ``chunk_frames``."""
    if cfg.num_heads % ranks:
        raise ValueError(f"sequence parallel: {cfg.name}'s {cfg.num_heads} heads are not divisible by the {ranks} "
                         "ranks (each rank holds num_heads / P heads)")
    tokens_per_rank(chunk_frames * cfg.tokens_per_frame, ranks)


class SequenceParallel(RankGroup):
    """The ranks of ``group`` (P of them) splitting every chunk's tokens, Ulysses-style (see the module docstring).

    Args:
        group: an initialised ``torch.distributed`` process group (``torch.distributed.group.WORLD`` for all ranks).

    Attributes:
        group; size: P; rank: this rank in ``group`` (a ``relaxkv_kernels`` :class:`RankGroup`).

    Example::

        parallel = SequenceParallel(dist.group.WORLD)
        cache = make_cache(model, policy, batch, process_group=parallel.group)   # H / P heads per rank
        flow = model(x, t, context, cache, parallel=parallel)                     # the full flow on every rank
    """

    def __init__(self, group):
        super().__init__("SequenceParallel", group)

    def token_range(self, tokens: int) -> tuple[int, int]:
        """This rank's ``[start, stop)`` of a chunk's ``tokens`` = S tokens (ValueError unless P divides S)."""
        n = tokens_per_rank(tokens, self.size)
        return self.rank * n, (self.rank + 1) * n

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, S, ...] -> this rank's tokens [B, S/P, ...] (a view)."""
        start, stop = self.token_range(x.shape[1])
        return x[:, start:stop]

    def shard_frames(self, m: torch.Tensor, frame_tokens: int) -> torch.Tensor:
        """Per-frame modulation m [B, U, ..., dim] -> [B, G, ..., dim]: one row per group of this rank's tokens.

        The rank's S/P tokens are cut into G groups of ``g = gcd(S/P, F)`` consecutive tokens: each lies in one
        frame (the range starts at a multiple of g, and F is one), so a block's per-group broadcast
        (``unflatten(1, (G, -1))``) gives every token its frame's modulation. Whole frames (F divides S/P): the
        rank's frames, G = S/(P*F). Wan2.1-1.3B (F = 1560, U = 3): G = 3 for P = 2, 4; G = 1 for P = 3, 6.
        """
        start, stop = self.token_range(m.shape[1] * frame_tokens)
        g = math.gcd(stop - start, frame_tokens)
        frames = torch.arange(start, stop, g, device=m.device) // frame_tokens  # [G]
        return m.index_select(1, frames)

    def seq_to_heads(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This rank's tokens of all heads -> all tokens of this rank's heads, in one all-to-all for all ``xs``.

        Args:
            xs: n tensors [B, S/P, H, D] of one shape and dtype (q, k, v).

        Returns:
            n contiguous tensors [B, S, H/P, D]: tokens in rank order (rank r's shard at ``r*S/P``), heads
            ``rank*H/P ..``. Each rank sends (and receives) ``n * B * (S/P) * H * D`` elements, ``(P-1)/P`` of
            them to other ranks.
        """
        import torch.distributed as dist

        p = self.size
        b, s, h, d = xs[0].shape
        if h % p:
            raise ValueError(f"SequenceParallel.seq_to_heads: {h} heads are not divisible by the {p} ranks")
        send = torch.stack(xs).view(len(xs), b, s, p, h // p, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        recv = torch.empty_like(send)  # [P (source rank), n, B, S/P, H/P, D]
        self.collective("all_to_all (sequence to heads)", dist.all_to_all_single, recv, send)
        return recv.permute(1, 2, 0, 3, 4, 5).reshape(len(xs), b, p * s, h // p, d).unbind(0)

    def heads_to_seq(self, y: torch.Tensor) -> torch.Tensor:
        """All tokens of this rank's heads y [B, S, H/P, D] -> this rank's tokens of all heads [B, S/P, H, D].

        The inverse of :meth:`seq_to_heads` for one tensor: ``B * (S/P) * H * D`` elements each way per rank.
        """
        import torch.distributed as dist

        p = self.size
        b, s, h, d = y.shape
        send = y.reshape(b, p, s // p, h, d).transpose(0, 1).contiguous()  # [P (destination rank), B, S/P, H/P, D]
        recv = torch.empty_like(send)  # [P (source rank = head group), B, S/P, H/P, D]
        self.collective("all_to_all (heads to sequence)", dist.all_to_all_single, recv, send)
        return recv.permute(1, 2, 0, 3, 4).reshape(b, s // p, p * h, d)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's tokens x [B, S/P, C] -> [B, S, C] (rank order), on every rank."""
        return self.gather(x, 1, "all_gather (tokens)")

    def around(self, cache: AttendFn, timer: Timer | None = None) -> AttendFn:
        """``cache`` (a head-parallel KVCache) seen from this rank's tokens: an :class:`AttendFn` taking and
        returning [B, S/P, H, D], with the all-to-alls timed as :data:`COMM_SECTION`."""
        return _UlyssesAttend(self, cache, timer)


class _UlyssesAttend:
    """``attend`` on this rank's tokens: all-to-all to heads, ``cache.attend``, all-to-all back."""

    def __init__(self, parallel: SequenceParallel, cache: AttendFn, timer: Timer | None):
        self.parallel, self.cache, self.timer = parallel, cache, timer

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v [B, S/P, H, D] -> [B, S/P, H, D]."""
        with timed(self.timer, COMM_SECTION):
            q, k, v = self.parallel.seq_to_heads(q, k, v)
        out = self.cache.attend(layer, q, k, v)  # [B, S, H/P, D]
        with timed(self.timer, COMM_SECTION):
            return self.parallel.heads_to_seq(out)
