"""mid_select through the CUDA extension (kernels: csrc/mid_select.cuh, launcher: csrc/mid_select.cu)."""
from __future__ import annotations

import torch

from ..cuda_common import Launch
from ..cuda_common import index
from ..cuda_common import rows
from ..cuda_common import unit_last_stride

_OP = "mid_select_cuda"


def mid_select_cuda(q: torch.Tensor, mean_key: torch.Tensor, mid_slots: torch.Tensor, block_pos: torch.Tensor,
                    seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor, row0: int, block_tokens: int,
                    q_stride: int, batch_mean: bool = False) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.mid_select` (two launches, no host synchronisation).

    qbar is summed in fp32 by a split reduction (grid (splits, H/2, B), 16-byte loads, deterministic order), then one
    block per sample (one for all with ``batch_mean``) takes the dot products (a warp per block) and the top k. q: fp16
    / bf16 / fp32, any strides. Slots are not checked here: an out-of-range mid slot scores 0 and gets an empty segment.

    Example:
        >>> q = torch.randn(1, 6240, 12, 128, device="cuda", dtype=torch.bfloat16)  # doctest: +SKIP
        >>> mk = torch.randn(1, 66, 12, 128, device="cuda")
        >>> seg = torch.zeros(1, 32, 3, dtype=torch.int32, device="cuda")
        >>> mids = torch.arange(20, device="cuda"); pos = torch.arange(66, device="cuda") * 4
        >>> s = mid_select_cuda(q, mk, mids, pos, seg, 8, torch.arange(16, device="cuda") * 4 + 32, 24960, 182, 8)
    """
    b, n_q, h, d = q.shape
    q = unit_last_stride(q)
    mid_slots, block_pos, target_pos = index(mid_slots), index(block_pos), index(target_pos)
    launch = Launch(_OP, q.device)
    n_split = launch.ext.mid_select_splits(-(-n_q // q_stride))
    ws = torch.empty(b * (h // 2) * (n_split + 1) * d, dtype=torch.float32, device=q.device)
    scores = torch.empty((b, mid_slots.numel()), dtype=torch.float32, device=q.device)
    with launch as (ext, stream):
        ext.mid_select_cuda(
            *rows(q), mean_key.data_ptr(), mean_key.stride(), mid_slots.data_ptr(), block_pos.data_ptr(),
            target_pos.data_ptr(), seg.data_ptr(), seg.stride(), scores.data_ptr(), ws.data_ptr(), b, n_q, h, d,
            mean_key.shape[1], mid_slots.numel(), target_pos.numel(), seg.shape[1], seg_index, row0, block_tokens,
            q_stride, bool(batch_mean), n_split, launch.code(q.dtype), stream,
        )
    return scores
