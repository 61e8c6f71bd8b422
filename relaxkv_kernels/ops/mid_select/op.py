"""``relaxkv::mid_select``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_index
from ..checks import check_int
from ..checks import check_qkv
from ..checks import check_seg_slice
from ..checks import check_tensor
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from .cuda import mid_select_cuda
from .reference import mid_select_ref


def _triton():
    from .triton import mid_select_triton

    return mid_select_triton


BACKENDS = OpBackends("mid_select", reference=mid_select_ref, triton=_triton, cuda=mid_select_cuda)


def _check(q: Tensor, mean_key: Tensor, mid_slots: Tensor, block_pos: Tensor, seg: Tensor, seg_index: int,
           target_pos: Tensor, row0: int, block_tokens: int, q_stride: int, batch_mean: bool) -> None:
    """The checks of :func:`mid_select` (public function and registered op)."""
    op = "relaxkv.mid_select"
    check_devices(op, q=q, mean_key=mean_key, mid_slots=mid_slots, block_pos=block_pos, seg=seg, target_pos=target_pos)
    check_qkv(op, "q", q)
    b, n_q, h, d = q.shape
    if n_q == 0:
        raise ValueError(f"{op}: q: expected at least one query token, got shape {tuple(q.shape)}")
    if h < 2:
        raise ValueError(f"{op}: q: expected at least 2 heads (the affinity uses the first H/2), got {h}")
    check_tensor(op, "mean_key", mean_key, shape=(b, None, h, d), dtypes=(torch.float32,))
    n_blocks = mean_key.shape[1]
    check_index(op, "mid_slots", mid_slots, None, 0, n_blocks - 1)
    if mid_slots.numel() == 0:
        raise ValueError(f"{op}: mid_slots: expected at least one mid block, got none")
    check_index(op, "block_pos", block_pos, n_blocks)
    check_index(op, "target_pos", target_pos)
    if not 1 <= target_pos.numel() <= mid_slots.numel():
        raise ValueError(f"{op}: target_pos: expected 1 .. {mid_slots.numel()} (mid blocks) entries, "
                         f"got {target_pos.numel()}")
    check_seg_slice(op, seg, b, seg_index, target_pos.numel())
    check_int(op, "row0", row0, low=0)
    check_int(op, "block_tokens", block_tokens, low=1)
    check_int(op, "q_stride", q_stride, low=1, high=n_q)
    if not isinstance(batch_mean, bool):
        raise TypeError(f"{op}: batch_mean: expected a bool, got {type(batch_mean).__name__}")


@torch.library.custom_op("relaxkv::mid_select", mutates_args=("seg",))
def mid_select_op(q: Tensor, mean_key: Tensor, mid_slots: Tensor, block_pos: Tensor, seg: Tensor, seg_index: int,
                  target_pos: Tensor, row0: int, block_tokens: int, q_stride: int, batch_mean: bool, backend: str,
                  checked: bool = False) -> Tensor:
    return BACKENDS.run(q.device, backend, checked, _check, q, mean_key, mid_slots, block_pos, seg, seg_index,
                        target_pos, row0, block_tokens, q_stride, batch_mean)


@mid_select_op.register_fake
def mid_select_fake(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, block_tokens, q_stride,
                    batch_mean, backend, checked=False):
    if checks_in_fake(checked, q):
        _check(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, block_tokens, q_stride, batch_mean)
    return mean_key.new_empty((q.shape[0], mid_slots.shape[0]))


def mid_select(q: Tensor, mean_key: Tensor, mid_slots: Tensor, block_pos: Tensor, seg: Tensor, seg_index: int,
               target_pos: Tensor, row0: int, block_tokens: int, q_stride: int = 1, batch_mean: bool = False,
               backend: str = "auto") -> Tensor:
    """PackForcing Mid-block top-k by query-key affinity, per sample, written into the segment table in time order.

    Sample b scores mid block m on its own subsampled queries Sq (every ``q_stride``-th token) and keys:

        s_{b,m} = sum_j sum_{i in Sq} mean_{h < H/2} q_{b,h,i} . k_{m,b,h,j} / sqrt(D)
                = |Sq| * Nc * mean_{h < H/2} qbar_{b,h} . mean_key[b, mid_slots[m], h] / sqrt(D)

    and its k = target_pos.numel() best blocks (a non-finite score is never chosen over a finite one; ties and
    non-finite scores go to the lower index), in mid_slots (time) order, go to ``seg[b, seg_index + j]`` as
    ``(row0 + slot * Nc, Nc, target_pos[j] - block_pos[slot])``. A sample selects the same blocks in a batch
    as alone. ``batch_mean``: the paper's rule, the mean over (b, h < H/2), one choice for every sample.

    Args:
        q: [B, Nq, H, D] pre-RoPE queries. mean_key: float32 [B, n_blocks, H, D] mean compressed key per slot.
        mid_slots: int32/int64 [M] archive slots, oldest first.
        block_pos: int32/int64 [n_blocks] first-frame position per slot.
        seg: int32 [B, n_seg, 3]; entries seg_index .. seg_index + k - 1 are written (k = target_pos.numel()).
        target_pos: int32/int64 [k] re-packed first-frame positions. row0: first compressed pool row.
        block_tokens: Nc. q_stride: query subsample stride. batch_mean: average the affinity over the batch.

    Returns:
        affinities float32 [B, M] (``batch_mean``: the batch-averaged affinity in every row).

    Example:
        >>> q, mean_key = torch.randn(2, 64, 4, 16), torch.randn(2, 6, 4, 16)
        >>> seg = torch.zeros(2, 8, 3, dtype=torch.int32)
        >>> s = mid_select(q, mean_key, torch.tensor([2, 3, 4, 5, 0]), torch.arange(6) * 4, seg, 3,
        ...                torch.tensor([30, 34]), 100, 8, q_stride=3)
        >>> tuple(s.shape)
        (2, 5)
    """
    _check(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, block_tokens, q_stride, batch_mean)
    return torch.ops.relaxkv.mid_select(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0,
                                        block_tokens, q_stride, batch_mean, backend, checked=True)
