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
    r"""Score the Relax Forcing candidates and write the selected history frames into ``seg``: one launch.

    With p_x = x / max(||x||, 1e-12) (sink / tail: x = mean of their frames' rows of ``proto``):

        r[b, c] = <p_{cand_slots[c]}, p_sink> - lam * <p_{cand_slots[c]}, p_tail>   (a term dropped when S or T = 0)

    The H_sel = target_pos.numel() best candidates of r[b] (of r[0] for everyone when
    ``batch0_decides``), ties to the lower candidate index, in memory order, go to
    ``seg[b, seg_index + j] = (slot * F, F, target_pos[j] - slot_pos[slot])`` (delta 0 when
    ``contiguous``). One block per batch element; frame means in fp32, norms and dots in fp64
    (warp shuffles). Same semantics as ``relax_select_ref``; no host synchronisation.

    Args:
        proto: float32 [B, n_slots, D] per-frame means of pre-RoPE keys (not normalised), any strides.
        slot_pos: int [n_slots] write-time frame position of each slot.
        sink_slots, tail_slots, cand_slots: int [S], [T], [C'] slots in memory order (values in
            [0, n_slots); not checked here, that would synchronise: an out-of-range slot reads as zeros).
        seg: int32 [B, n_seg, 3], rows seg_index .. seg_index + H_sel - 1 written in place.
        seg_index: first history row. target_pos: int [H_sel], 1 <= H_sel <= C'.
        frame_tokens: F. lam: lambda. batch0_decides, contiguous: see above.

    Returns:
        scores: float32 [B, C'] (each batch element's own scores).

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
