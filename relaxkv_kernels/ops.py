"""The ``torch.ops.relaxkv.*`` ops: registration, fake implementations, backend dispatch, public wrappers.

Each op is a ``torch.library.custom_op`` whose implementation picks a backend at call time:

    reference  pure PyTorch (``relaxkv_kernels.reference``), CPU and CUDA
    triton     ``relaxkv_kernels.triton`` (CUDA, or CPU under ``TRITON_INTERPRET=1``)
    cuda       the compiled extension ``relaxkv_kernels._C`` (CUDA only)
    auto       the fastest available for the tensors' device

The backend comes from the call's ``backend`` argument, else ``RELAXKV_BACKEND_<OP>`` (e.g.
``RELAXKV_BACKEND_SPARSE_KV_ATTENTION=triton``), else ``RELAXKV_BACKEND``, else ``auto``. Public wrappers
validate every argument before the op runs; index tensors stay on the device (no host sync).
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import reference, tuning
from .availability import cuda_extension, interpreter_enabled, triton_available
from .cuda import _launch
from .validate import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    can_inspect,
    check_finite,
    check_head_dim,
    check_index_range,
    check_int,
    check_segments,
    check_tensor,
)

BACKENDS = ("auto", "reference", "triton", "cuda")
_REFERENCE = {
    "rope_append": reference.rope_append_ref,
    "sparse_kv_attention": reference.sparse_kv_attention_ref,
    "relax_select": reference.relax_select_ref,
    "mid_select": reference.mid_select_ref,
    "compress_kv": reference.compress_kv_into_ref,
    "gather_kv_rope": reference.gather_kv_rope_ref,
}
# ops with a kernel in relaxkv_kernels._C
_CUDA_OPS = frozenset({"rope_append", "relax_select", "mid_select", "compress_kv", "gather_kv_rope"})
_NO_TRITON = frozenset({"gather_kv_rope"})  # ops without a kernel in relaxkv_kernels.triton
# "auto" prefers Triton where both exist: the Triton kernels are verified against the references (interpreter
# tier); the CUDA ones have only been compiled so far. Select them with backend="cuda" (or RELAXKV_BACKEND_<OP>)
# and move them here once the GPU tests (tests/test_cuda_ops.py -m gpu) and benchmarks have run.
_CUDA_AUTO = frozenset({"gather_kv_rope"})


def resolve_backend(op: str, device: torch.device, backend: str = "auto") -> str:
    """The backend that runs ``op`` for tensors on ``device`` (see the module docstring)."""
    if backend == "auto":
        backend = os.environ.get(f"RELAXKV_BACKEND_{op.upper()}") or os.environ.get("RELAXKV_BACKEND", "auto")
    if backend not in BACKENDS:
        raise ValueError(f"relaxkv.{op}: backend: expected one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type == "cuda":
            if op in _CUDA_AUTO and cuda_extension() is not None:
                return "cuda"
            if triton_available() and op not in _NO_TRITON:
                return "triton"
        return "reference"
    if backend == "triton" and op in _NO_TRITON:
        raise RuntimeError(f"relaxkv.{op}: backend 'triton': no Triton kernel for this op (use 'cuda' or 'reference')")
    if backend == "triton" and not (triton_available() and (device.type == "cuda" or interpreter_enabled())):
        raise RuntimeError(
            f"relaxkv.{op}: backend 'triton' needs triton and a CUDA tensor (or TRITON_INTERPRET=1 on CPU), "
            f"got device {device}"
        )
    if backend == "cuda" and (op not in _CUDA_OPS or device.type != _launch.runtime.device_type):
        raise RuntimeError(f"relaxkv.{op}: backend 'cuda' needs a CUDA kernel for this op and CUDA tensors, got {device}")
    return backend


def implementation(op: str, device: torch.device, backend: str = "auto"):
    """The function that computes ``op`` on ``device`` with ``backend``."""
    name = resolve_backend(op, device, backend)
    if name == "reference":
        return _REFERENCE[op]
    return getattr(importlib.import_module(f"relaxkv_kernels.{name}"), f"{op}_{name}")


# ----------------------------------------------------------------------------------------------------
# registrations


@torch.library.custom_op("relaxkv::rope_append", mutates_args=("k_cache", "v_cache", "proto"))
def _rope_append_op(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, proto: Tensor,
    frame_slot: Tensor, frame_pos: Tensor, height: int, width: int, backend: str,
) -> Tensor:
    fn = implementation("rope_append", q.device, backend)
    return fn(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width)


@_rope_append_op.register_fake
def _(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("relaxkv::sparse_kv_attention", mutates_args=())
def _sparse_kv_attention_op(q: Tensor, k_pool: Tensor, v_pool: Tensor, seg: Tensor, scale: float, backend: str) -> Tensor:
    return implementation("sparse_kv_attention", q.device, backend)(q, k_pool, v_pool, seg, scale)


@_sparse_kv_attention_op.register_fake
def _(q, k_pool, v_pool, seg, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("relaxkv::relax_select", mutates_args=("seg",))
def _relax_select_op(
    proto: Tensor, slot_pos: Tensor, sink_slots: Tensor, tail_slots: Tensor, cand_slots: Tensor, seg: Tensor,
    seg_index: int, target_pos: Tensor, frame_tokens: int, lam: float, batch0_decides: bool, contiguous: bool,
    backend: str,
) -> Tensor:
    fn = implementation("relax_select", proto.device, backend)
    return fn(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos,
              frame_tokens, lam, batch0_decides, contiguous)


@_relax_select_op.register_fake
def _(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index, target_pos, frame_tokens, lam,
      batch0_decides, contiguous, backend):
    return proto.new_empty((proto.shape[0], cand_slots.shape[0]))


@torch.library.custom_op("relaxkv::mid_select", mutates_args=("seg",))
def _mid_select_op(
    q: Tensor, mean_key: Tensor, mid_slots: Tensor, block_pos: Tensor, seg: Tensor, seg_index: int,
    target_pos: Tensor, row0: int, block_tokens: int, q_stride: int, backend: str,
) -> Tensor:
    fn = implementation("mid_select", q.device, backend)
    return fn(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, block_tokens, q_stride)


@_mid_select_op.register_fake
def _(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0, block_tokens, q_stride, backend):
    return mean_key.new_empty((mid_slots.shape[0],))


@torch.library.custom_op("relaxkv::compress_kv", mutates_args=("k_pool", "v_pool", "mean_key"))
def _compress_kv_op(
    k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, mean_key: Tensor, block_slot: Tensor, t0: Tensor,
    row0: int, frames: int, height: int, width: int, backend: str,
) -> None:
    fn = implementation("compress_kv", k.device, backend)
    fn(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width)


@_compress_kv_op.register_fake
def _(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, backend):
    return None


@torch.library.custom_op("relaxkv::gather_kv_rope", mutates_args=())
def _gather_kv_rope_op(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int, backend: str) -> tuple[Tensor, Tensor]:
    return implementation("gather_kv_rope", k_pool.device, backend)(k_pool, v_pool, seg, total)


@_gather_kv_rope_op.register_fake
def _(k_pool, v_pool, seg, total, backend):
    shape = (k_pool.shape[0], total, k_pool.shape[2], k_pool.shape[3])
    return k_pool.new_empty(shape), v_pool.new_empty(shape)


# ----------------------------------------------------------------------------------------------------
# public wrappers (validation, defaults)


def _check_qkv_like(op: str, name: str, t: Tensor, device=None) -> Tensor:
    t = check_tensor(op, name, t, shape=(None, None, None, None), dtypes=FLOAT_DTYPES, device=device)
    check_head_dim(op, name, t.shape[-1])
    return t


def _check_pool(op: str, name: str, pool: Tensor, like: Tensor) -> Tensor:
    b, _, h, d = like.shape
    return check_tensor(op, name, pool, shape=(b, None, h, d), dtypes=(like.dtype,), device=like.device)


def _check_index(op: str, name: str, t: Tensor, device, length=None, low=None, high=None) -> Tensor:
    check_tensor(op, name, t, shape=(length,), dtypes=INDEX_DTYPES, device=device)
    if low is not None:
        check_index_range(op, name, t, low, high)
    return t


def rope_append(
    q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, proto: Tensor,
    frame_slot: Tensor, frame_pos: Tensor, height: int, width: int, backend: str = "auto",
) -> Tensor:
    """Rotate a chunk's Q and K with Wan 3D RoPE and append K (rotated), V and prototypes to the cache.

    Args:
        q, k, v: [B, U * F, H, D] after q/k norm, before RoPE (F = height * width).
        k_cache, v_cache: [B, n_rows, H, D], same dtype as k; frame slot s owns rows s*F .. s*F+F-1.
        proto: float32 [B, n_slots, D], receives each frame's mean pre-RoPE key (not normalised).
        frame_slot: int32/int64 [U] slot per chunk frame; frame_pos: int32/int64 [U] temporal position per frame.

    Returns:
        Q rotated at (frame_pos[u], y, x), [B, U * F, H, D]. The caches and proto are written in place.

    Example:
        >>> q = rope_append(q, k, v, kc, vc, proto, torch.tensor([4, 5, 6]), torch.tensor([9, 10, 11]), 30, 52)
    """
    op = "relaxkv.rope_append"
    _check_qkv_like(op, "q", q)
    check_int(op, "height", height, low=1)
    check_int(op, "width", width, low=1)
    f = height * width
    if q.shape[1] % f:
        raise ValueError(f"{op}: q: expected a whole number of frames of {height}x{width} = {f} tokens, got {q.shape[1]}")
    check_tensor(op, "k", k, shape=tuple(q.shape), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "v", v, shape=tuple(q.shape), dtypes=(q.dtype,), device=q.device)
    u = q.shape[1] // f
    _check_pool(op, "k_cache", k_cache, k)
    _check_pool(op, "v_cache", v_cache, k)
    if k_cache.shape[1] != v_cache.shape[1]:
        raise ValueError(f"{op}: v_cache: expected {k_cache.shape[1]} rows like k_cache, got {v_cache.shape[1]}")
    n_slots = k_cache.shape[1] // f
    check_tensor(op, "proto", proto, shape=(q.shape[0], None, q.shape[-1]), dtypes=(torch.float32,), device=q.device)
    _check_index(op, "frame_slot", frame_slot, q.device, u, 0, min(n_slots, proto.shape[1]) - 1)
    _check_index(op, "frame_pos", frame_pos, q.device, u)
    return torch.ops.relaxkv.rope_append(q, k, v, k_cache, v_cache, proto, frame_slot, frame_pos, height, width, backend)


def sparse_kv_attention(
    q: Tensor, k_pool: Tensor, v_pool: Tensor, seg: Tensor, scale: float | None = None, backend: str = "auto",
    impl: str = "auto", total: int | None = None,
) -> Tensor:
    """Attention of q over the K/V rows listed by a device-side segment table, RoPE re-indexed on load.

    out = softmax(q K^T * scale) V, K = concat over segments s of R_t(delta_s) k_pool[start_s : start_s + len_s]
    (R_t: temporal-only RoPE rotation), fp32 accumulation.

    Args:
        q: [B, Nq, H, D] rotated queries. k_pool, v_pool: [B, n_rows, H, D], same dtype as q.
        seg: int32 [B, n_seg, 3] rows (start_row, length, delta); length 0 = unused entry.
        scale: softmax scale, default D ** -0.5.
        backend: backend of the ops that run (see the module docstring).
        impl: "fused" (the segment-table attention op), "gather" (:func:`gather_kv_rope`, then
            flash_attn_func when importable, else SDPA with the flash / cuDNN backends preferred on
            CUDA), or "auto": the choice of ``relaxkv_kernels/tuning.json`` for this device and shape
            ("fused" without an entry, without ``total``, or inside torch.compile: pass impl there).
        total: keys per batch element, sum of the table's lengths (host-known from the plan);
            required by "gather".

    Returns:
        [B, Nq, H, D] in q.dtype.
    """
    op = "relaxkv.sparse_kv_attention"
    _check_qkv_like(op, "q", q)
    _check_pool(op, "k_pool", k_pool, q)
    check_tensor(op, "v_pool", v_pool, shape=tuple(k_pool.shape), dtypes=(q.dtype,), device=q.device)
    check_tensor(op, "seg", seg, shape=(q.shape[0], None, 3), dtypes=(torch.int32,), device=q.device)
    check_segments(op, seg, k_pool.shape[1])
    scale = q.shape[-1] ** -0.5 if scale is None else check_finite(op, "scale", scale)
    if impl not in ("auto", *tuning.IMPLS):
        raise ValueError(f"{op}: impl: expected one of {('auto', *tuning.IMPLS)}, got {impl!r}")
    if total is not None:
        _check_total(op, seg, total)
    elif impl == "gather":
        raise ValueError(f"{op}: total: required for impl='gather' (keys per batch element, sum of segment lengths)")
    if impl == "auto":  # the table is read on the host; compiled callers pass impl (KVCache does)
        compiling = torch.compiler.is_compiling()
        impl = "fused" if total is None or compiling else tuning.choose_impl(str(q.device), q.shape[-1], q.shape[1], total)
    if impl == "gather":
        return _gather_attention(q, k_pool, v_pool, seg, scale, total, backend)
    return torch.ops.relaxkv.sparse_kv_attention(q, k_pool, v_pool, seg, scale, backend)


def _check_total(op: str, seg: Tensor, total: int) -> None:
    check_int(op, "total", total, low=1)
    if can_inspect(seg) and seg.numel():
        rows = seg[..., 1].long().clamp_min(0).sum(-1)
        if bool((rows != total).any()):
            raise ValueError(f"{op}: total: expected sum(length) of every batch element, {rows.tolist()}, got {total}")


# impl="gather" on CUDA: the fastest SDPA kernels first (flash, then cuDNN), the others as fallbacks.
_SDPA_PREFERENCE = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH]


@torch.compiler.assume_constant_result
def _has_flash_attn() -> bool:
    """Whether flash-attn is installed (checked without importing it; a constant under torch.compile)."""
    return importlib.util.find_spec("flash_attn") is not None


def _gather_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, seg: Tensor, scale: float, total: int,
                      backend: str) -> Tensor:
    """impl="gather": contiguous K/V of the segments, then a dense attention kernel."""
    k, v = torch.ops.relaxkv.gather_kv_rope(k_pool, v_pool, seg, total, backend)  # [B, total, H, D]
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _has_flash_attn():
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, softmax_scale=scale)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, H, N, D] views
    if not q.is_cuda:
        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    with sdpa_kernel(_SDPA_PREFERENCE, set_priority=True):
        out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, scale=scale)
    return out.transpose(1, 2)


def gather_kv_rope(k_pool: Tensor, v_pool: Tensor, seg: Tensor, total: int, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """K (temporal delta-rotated) and V of a segment table, gathered into contiguous tensors.

    k[b] = concat over segments s of R_t(delta_s) k_pool[b, start_s : start_s + len_s], v[b] likewise
    without rotation; zero-length segments skipped.

    Args:
        k_pool, v_pool: [B, n_rows, H, D], same dtype. seg: int32 [B, n_seg, 3] (start_row, length, delta).
        total: rows per batch element = sum of the lengths of every batch element (host-known from
            the plan; checked here for CPU tables, not for device tables: that would synchronise).

    Returns:
        (k, v): [B, total, H, D] each, contiguous, dtype of the pools.

    Example:
        >>> k, v = gather_kv_rope(k_pool, v_pool, seg, total=10920)
    """
    op = "relaxkv.gather_kv_rope"
    _check_qkv_like(op, "k_pool", k_pool)
    check_tensor(op, "v_pool", v_pool, shape=tuple(k_pool.shape), dtypes=(k_pool.dtype,), device=k_pool.device)
    check_tensor(op, "seg", seg, shape=(k_pool.shape[0], None, 3), dtypes=(torch.int32,), device=k_pool.device)
    check_segments(op, seg, k_pool.shape[1])
    _check_total(op, seg, total)
    return torch.ops.relaxkv.gather_kv_rope(k_pool, v_pool, seg, total, backend)


def _check_seg_slice(op: str, seg: Tensor, batch: int, device, seg_index: int, count: int) -> None:
    check_tensor(op, "seg", seg, shape=(batch, None, 3), dtypes=(torch.int32,), device=device)
    check_int(op, "seg_index", seg_index, low=0, high=seg.shape[1] - count)


def relax_select(
    proto: Tensor, slot_pos: Tensor, sink_slots: Tensor, tail_slots: Tensor, cand_slots: Tensor, seg: Tensor,
    seg_index: int, target_pos: Tensor, frame_tokens: int, lam: float = 2.0, batch0_decides: bool = False,
    contiguous: bool = False, backend: str = "auto",
) -> Tensor:
    """Relax Forcing selection: r(h) = <p_h, p_sink> - lam * <p_h, p_tail>, top-H into the segment table.

    Args:
        proto: float32 [B, n_slots, D] per-frame mean pre-RoPE keys. slot_pos: int32/int64 [n_slots] write positions.
        sink_slots, tail_slots, cand_slots: int32/int64 [S], [T], [C'] slots (memory order).
        seg: int32 [B, n_seg, 3]; entries seg_index .. seg_index + H - 1 are written.
        target_pos: int32/int64 [H] positions given to the selected frames (hybrid RoPE). frame_tokens: F.

    Returns:
        scores float32 [B, C'].
    """
    op = "relaxkv.relax_select"
    check_tensor(op, "proto", proto, shape=(None, None, None), dtypes=(torch.float32,))
    dev, n_slots = proto.device, proto.shape[1]
    _check_index(op, "slot_pos", slot_pos, dev, n_slots)
    for name, t in (("sink_slots", sink_slots), ("tail_slots", tail_slots), ("cand_slots", cand_slots)):
        _check_index(op, name, t, dev, None, 0, n_slots - 1)
    _check_index(op, "target_pos", target_pos, dev)
    if not 1 <= target_pos.numel() <= cand_slots.numel():
        raise ValueError(f"{op}: target_pos: expected 1 .. {cand_slots.numel()} (candidates) entries, got {target_pos.numel()}")
    _check_seg_slice(op, seg, proto.shape[0], dev, seg_index, target_pos.numel())
    check_int(op, "frame_tokens", frame_tokens, low=1)
    lam = check_finite(op, "lam", lam)
    return torch.ops.relaxkv.relax_select(proto, slot_pos, sink_slots, tail_slots, cand_slots, seg, seg_index,
                                          target_pos, frame_tokens, lam, batch0_decides, contiguous, backend)


def mid_select(
    q: Tensor, mean_key: Tensor, mid_slots: Tensor, block_pos: Tensor, seg: Tensor, seg_index: int,
    target_pos: Tensor, row0: int, block_tokens: int, q_stride: int = 1, backend: str = "auto",
) -> Tensor:
    """PackForcing Mid-block top-k by query-key affinity, written into the segment table in time order.

    Args:
        q: [B, Nq, H, D] pre-RoPE queries. mean_key: float32 [B, n_blocks, H, D] mean compressed key per slot.
        mid_slots: int32/int64 [M] archive slots, oldest first. block_pos: int32/int64 [n_blocks] first-frame position per slot.
        seg: int32 [B, n_seg, 3]; entries seg_index .. seg_index + k - 1 are written (k = target_pos.numel()).
        target_pos: int32/int64 [k] re-packed first-frame positions. row0: first compressed pool row.
        block_tokens: Nc. q_stride: query subsample stride.

    Returns:
        affinities float32 [M].
    """
    op = "relaxkv.mid_select"
    _check_qkv_like(op, "q", q)
    b, _, h, d = q.shape
    check_tensor(op, "mean_key", mean_key, shape=(b, None, h, d), dtypes=(torch.float32,), device=q.device)
    n_blocks = mean_key.shape[1]
    _check_index(op, "mid_slots", mid_slots, q.device, None, 0, n_blocks - 1)
    _check_index(op, "block_pos", block_pos, q.device, n_blocks)
    _check_index(op, "target_pos", target_pos, q.device)
    if not 1 <= target_pos.numel() <= mid_slots.numel():
        raise ValueError(f"{op}: target_pos: expected 1 .. {mid_slots.numel()} (mid blocks) entries, got {target_pos.numel()}")
    _check_seg_slice(op, seg, b, q.device, seg_index, target_pos.numel())
    check_int(op, "row0", row0, low=0)
    check_int(op, "block_tokens", block_tokens, low=1)
    check_int(op, "q_stride", q_stride, low=1, high=q.shape[1])
    if h < 2:
        raise ValueError(f"{op}: q: expected at least 2 heads (the affinity uses the first H/2), got {h}")
    return torch.ops.relaxkv.mid_select(q, mean_key, mid_slots, block_pos, seg, seg_index, target_pos, row0,
                                        block_tokens, q_stride, backend)


def compress_kv(
    k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, mean_key: Tensor, block_slot: Tensor, t0: Tensor,
    row0: int, frames: int, height: int, width: int, backend: str = "auto",
) -> None:
    """PackForcing compression: 2x4x4 average pooling of a block's K and V into compressed pool rows.

    Pooled keys are rotated at their window centres (t0 + 2 tc + 0.5, 4 yc + 1.5, 4 xc + 1.5).

    Args:
        k, v: [B, frames * F, H, D] pre-RoPE block keys / values.
        k_pool, v_pool: [B, n_rows, H, D]; rows row0 + slot * Nc .. + Nc - 1 are written.
        mean_key: float32 [B, n_blocks, H, D]; entry ``slot`` receives the mean pooled pre-RoPE key.
        block_slot, t0: int32/int64 [1] archive slot and first-frame position (device tensors: no host sync).
    """
    op = "relaxkv.compress_kv"
    _check_qkv_like(op, "k", k)
    for name, value in (("frames", frames), ("height", height), ("width", width)):
        check_int(op, name, value, low=1)
    if frames < 2 or height < 4 or width < 4:
        raise ValueError(f"{op}: block: expected at least 2x4x4 (t, y, x) to pool, got {frames}x{height}x{width}")
    if k.shape[1] != frames * height * width:
        raise ValueError(f"{op}: k: expected {frames}*{height}*{width} = {frames * height * width} tokens, got {k.shape[1]}")
    check_tensor(op, "v", v, shape=tuple(k.shape), dtypes=(k.dtype,), device=k.device)
    _check_pool(op, "k_pool", k_pool, k)
    check_tensor(op, "v_pool", v_pool, shape=tuple(k_pool.shape), dtypes=(k.dtype,), device=k.device)
    b, _, h, d = k.shape
    check_tensor(op, "mean_key", mean_key, shape=(b, None, h, d), dtypes=(torch.float32,), device=k.device)
    nc = (frames // 2) * (height // 4) * (width // 4)
    check_int(op, "row0", row0, low=0, high=k_pool.shape[1] - nc)
    n_blocks = min(mean_key.shape[1], (k_pool.shape[1] - row0) // nc)
    _check_index(op, "block_slot", block_slot, k.device, 1, 0, n_blocks - 1)
    _check_index(op, "t0", t0, k.device, 1)
    torch.ops.relaxkv.compress_kv(k, v, k_pool, v_pool, mean_key, block_slot, t0, row0, frames, height, width, backend)
