"""relax_select through the CUDA extension (kernel: csrc/relax_select.cuh, launcher: csrc/relax_select.cu)."""
from __future__ import annotations

import torch

from ...geometry import PROTO_EPS
from ..cuda_common import Launch
from ..cuda_common import index

_OP = "relax_select_cuda"


def relax_select_cuda(proto: torch.Tensor, slot_pos: torch.Tensor, sink_slots: torch.Tensor, tail_slots: torch.Tensor,
                      cand_slots: torch.Tensor, seg: torch.Tensor, seg_index: int, target_pos: torch.Tensor,
                      frame_tokens: int, lam: float, batch0_decides: bool, contiguous: bool) -> torch.Tensor:
    """Contract: :func:`relaxkv_kernels.ops.relax_select` (one launch, no host synchronisation).

    One block per batch element; frame means in fp32, norms and dots in fp64 (warp shuffles). Slots are not checked
    here (that would synchronise): an out-of-range slot reads as zeros. proto: any strides.

    Example:
        >>> proto = torch.randn(1, 8, 128, device="cuda")  # doctest: +SKIP
        >>> seg = torch.zeros(1, 7, 3, dtype=torch.int32, device="cuda")
        >>> idx = lambda *v: torch.tensor(v, device="cuda")
        >>> scores = relax_select_cuda(proto, idx(*range(8)), idx(0, 1), idx(7), idx(3, 4, 5, 6), seg, 2,
        ...                            idx(20), 1560, 2.0, False, False)
    """
    b, n_slots, d = proto.shape
    slot_pos, sink_slots, tail_slots, cand_slots, target_pos = map(
        index, (slot_pos, sink_slots, tail_slots, cand_slots, target_pos))
    n_cand, n_sel = cand_slots.numel(), target_pos.numel()
    scores = torch.empty((b, n_cand), dtype=torch.float32, device=proto.device)
    with Launch(_OP, proto.device) as (ext, stream):
        ext.relax_select_cuda(
            proto.data_ptr(), proto.stride(), slot_pos.data_ptr(), sink_slots.data_ptr(), tail_slots.data_ptr(),
            cand_slots.data_ptr(), target_pos.data_ptr(), seg.data_ptr(), seg.stride(), scores.data_ptr(),
            b, n_slots, d, sink_slots.numel(), tail_slots.numel(), n_cand, n_sel, seg.shape[1], seg_index,
            frame_tokens, float(lam), PROTO_EPS, bool(batch0_decides), bool(contiguous), stream,
        )
    return scores
