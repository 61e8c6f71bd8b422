"""``relaxkv::relax_select``: registration, fake, backend table, the argument checks and the public function.

``torch.ops.relaxkv.*`` takes the public arguments in order, then ``checked`` (see ``ops/checks.py``).
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..checks import check_devices
from ..checks import check_finite
from ..checks import check_index
from ..checks import check_int
from ..checks import check_seg_slice
from ..checks import check_tensor
from ..checks import checks_in_fake
from ..dispatch import OpBackends
from .cuda import relax_select_cuda
from .reference import relax_select_ref


def _triton():
    from .triton import relax_select_triton

    return relax_select_triton


BACKENDS = OpBackends("relax_select", reference=relax_select_ref, triton=_triton, cuda=relax_select_cuda)


def _check(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos, frame_tokens, lam,
           batch0_decides, contiguous) -> float:
    """The checks of :func:`relax_select` (public function and registered op); returns ``lam`` as a float."""
    op = "relaxkv.relax_select"
    for name, flag in (("batch0_decides", batch0_decides), ("contiguous", contiguous)):
        if not isinstance(flag, bool):
            raise TypeError(f"{op}: {name}: expected a bool, got {type(flag).__name__}")
    check_devices(op, proto=proto, slot_pos=slot_pos, sink_slots=sink_slots, tail_slots=tail_slots,
                  cand_slots=cand_slots, seg=seg, target_pos=target_pos)
    check_tensor(op, "proto", proto, shape=(None, None, None), dtypes=(torch.float32,))
    n_slots = proto.shape[1]
    check_index(op, "slot_pos", slot_pos, n_slots)
    for name, t in (("sink_slots", sink_slots), ("tail_slots", tail_slots), ("cand_slots", cand_slots)):
        check_index(op, name, t, None, 0, n_slots - 1)
    if cand_slots.numel() == 0:
        raise ValueError(f"{op}: cand_slots: expected at least one candidate, got none")
    check_index(op, "target_pos", target_pos)
    if not 1 <= target_pos.numel() <= cand_slots.numel():
        raise ValueError(f"{op}: target_pos: expected 1 .. {cand_slots.numel()} (candidates) entries, "
                         f"got {target_pos.numel()}")
    check_seg_slice(op, seg, proto.shape[0], seg_index, target_pos.numel())
    check_int(op, "frame_tokens", frame_tokens, low=1)
    return check_finite(op, "lam", lam)


@torch.library.custom_op("relaxkv::relax_select", mutates_args=("seg",))
def relax_select_op(proto: Tensor, slot_pos: Tensor, sink_slots: Tensor, tail_slots: Tensor, cand_slots: Tensor,
                    seg: Tensor, seg_index: int, target_pos: Tensor, frame_tokens: int, lam: float,
                    batch0_decides: bool, contiguous: bool, backend: str, checked: bool = False) -> Tensor:
    return BACKENDS.run(proto.device, backend, checked, _check, proto, slot_pos, sink_slots, tail_slots, cand_slots,
                        seg, seg_index, target_pos, frame_tokens, lam, batch0_decides, contiguous)


@relax_select_op.register_fake
def relax_select_fake(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos, frame_tokens,
                      lam, batch0_decides, contiguous, backend, checked=False):
    if checks_in_fake(checked, proto):
        _check(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos, frame_tokens, lam,
               batch0_decides, contiguous)
    return proto.new_empty((proto.shape[0], cand_slots.shape[0]))


def relax_select(proto: Tensor, slot_pos: Tensor, sink_slots: Tensor, tail_slots: Tensor, cand_slots: Tensor,
                 seg: Tensor, seg_index: int, target_pos: Tensor, frame_tokens: int, lam: float = 2.0,
                 batch0_decides: bool = False, contiguous: bool = False, backend: str = "auto") -> Tensor:
    """Relax Forcing selection: r(h) = <p_h, p_sink> - lam * <p_h, p_tail>, top-H into the segment table.

    With p_x = x / max(||x||, 1e-12) (sink / tail: x = the mean of their frames' rows of ``proto``; a term is dropped
    when its slot list is empty):

        r[b, c] = <p_{cand_slots[c]}, p_sink> - lam * <p_{cand_slots[c]}, p_tail>

    The H_sel = target_pos.numel() best candidates of r[b] (of r[0] for every b when ``batch0_decides``; ties to the
    lower candidate index; a non-finite score is never chosen over a finite one), in memory order, go to
    ``seg[b, seg_index + j] = (slot * F, F, target_pos[j] - slot_pos[slot])`` (hybrid RoPE), or delta 0 when
    ``contiguous`` (keys keep their true positions).

    Args:
        proto: float32 [B, n_slots, D] per-frame means of pre-RoPE keys (not normalised).
        slot_pos: int32/int64 [n_slots] write-time frame position of each slot.
        sink_slots, tail_slots, cand_slots: int32/int64 [S], [T], [C'] slots (memory order).
        seg: int32 [B, n_seg, 3]; entries seg_index .. seg_index + H_sel - 1 are written in place.
        seg_index: first segment row of the history frames.
        target_pos: int32/int64 [H_sel] positions given to the selected frames, 1 <= H_sel <= C'. frame_tokens: F.
        lam: lambda. batch0_decides, contiguous: see above. backend: "auto", "reference", "triton" or "cuda".

    Returns:
        scores float32 [B, C'] (each batch element's own scores; NaN for a candidate whose prototype is not finite).

    Example:
        >>> proto, seg = torch.randn(1, 8, 16), torch.zeros(1, 7, 3, dtype=torch.int32)
        >>> scores = relax_select(proto, torch.arange(8), torch.tensor([0, 1]), torch.tensor([7]),
        ...                       torch.tensor([3, 4, 5, 6]), seg, 2, torch.tensor([20]), 1560)
        >>> tuple(scores.shape)
        (1, 4)
    """
    lam = _check(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos, frame_tokens, lam,
                 batch0_decides, contiguous)
    return torch.ops.relaxkv.relax_select(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index,
                                          target_pos, frame_tokens, lam, batch0_decides, contiguous, backend,
                                          checked=True)
