"""KVCache with FP8 pools (``kv_dtype=torch.float8_e4m3fn``): every policy in every attention mode and backend.

- The pools hold exactly the e4m3 codes and scales of what a cache with pools in the compute dtype holds
  (``quantize_fp8`` of its rows: quantized where the rows enter, the window commit included).
- Selections (Relax's history, Pack's mid blocks) are those of the same cache with bf16 pools, every layer.
- The attention output's error against a float32 cache is more than with bf16 pools (the pools are really
  FP8) and at most 2 x 16 times it: an e4m3 code keeps 4 significant bits, bf16 8, so the stored rows'
  rounding error is 16 times larger and the rest of the computation is the same (2x slack for the
  statistics; ``benchmarks/reports/fp8_budget.py`` measures it over whole generator rollouts).
- The Triton kernels (interpreter) and the csrc kernels (emulated) give the reference backend's pools and
  outputs; the memory is about half; bad ``kv_dtype`` values are named errors; on a GPU the e4m3 bound holds
  at Wan shapes (tests/cache/test_window.py replays FP8 chunk steps from CUDA graphs).
"""
import pytest
import torch

import relaxkv_kernels as rk
from relaxkv_kernels.ops.fp8 import quantize_fp8

from helpers import FP8
from helpers import assert_fp8_equal
from helpers import cache_rollout
from helpers import held_rows

POLICIES = {
    "dense": rk.DenseWindow(window=9),
    "sink-rerotate": rk.DenseWindow(window=9, sink=3, rerotate=True),
    "relax": rk.RelaxMemory(reservoir=30),
    "pack": rk.PackMemory(top_k=1, archive=3, q_stride=2),  # top 1 of up to 3 blocks: a real choice
}
MODES = ["segments", "window", "per_call"]
STEP_RATIO = 16  # e4m3 keeps 4 significant bits, bf16 8


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("name", list(POLICIES))
def test_pools_hold_the_quantized_rows_of_a_full_precision_cache(name, attention):
    """fp32 compute, reference ops: the FP8 cache's held rows (frames and Pack's compressed blocks) are
    quantize_fp8 of the fp32 cache's, bit for bit, whether rope_append wrote the pool (segments) or the
    window commit did (window, per_call)."""
    policy = POLICIES[name]
    _, full = cache_rollout(policy, backend="reference", attention=attention)
    _, fp8 = cache_rollout(policy, backend="reference", attention=attention, kv_dtype=FP8)
    rows = held_rows(full)
    if name == "pack":  # and the archive of compressed blocks
        pl = full.planner
        rows = torch.cat([rows, torch.arange(pl.row0, pl.n_rows)[full.storage.k[0, 0, pl.row0:, 0, 0].isfinite()]])
    for pool, scale, ref in ((fp8.storage.k, fp8.storage.k_scale, full.storage.k),
                             (fp8.storage.v, fp8.storage.v_scale, full.storage.v)):
        assert_fp8_equal(pool[:, :, rows], scale[:, :, rows], *quantize_fp8(ref[:, :, rows]), f"{name} {attention}")


@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("name", list(POLICIES))
def test_fp8_error_is_bounded_by_e4m3_and_selections_do_not_change(name, attention):
    """bf16 compute, reference ops, the same inputs: FP8 pools against bf16 pools, both against an fp32 cache."""
    policy = POLICIES[name]
    truth, _ = cache_rollout(policy, backend="reference", attention="segments")
    same_out, same = cache_rollout(policy, dtype=torch.bfloat16, backend="reference", attention=attention)
    fp8_out, fp8 = cache_rollout(policy, dtype=torch.bfloat16, backend="reference", attention=attention,
                                 kv_dtype=FP8)
    err_same, err_fp8 = _rel(same_out, truth), _rel(fp8_out, truth)
    assert err_same < err_fp8 <= 2 * STEP_RATIO * err_same, (err_same, err_fp8)
    for layer in range(same.num_layers):  # the last chunk's tables (pack: a choice per layer)
        assert fp8.selected_frames(layer) == same.selected_frames(layer)
    assert torch.equal(fp8.plan_buffers.seg, same.plan_buffers.seg)


@pytest.mark.parametrize("name", ["relax", "pack"])
def test_selections_match_bf16_pools_at_every_chunk(name):
    """Chunk by chunk (not only the last), every layer: the prototypes and Pack's mean keys are computed before
    quantization, so FP8 pools choose what bf16 pools choose."""
    policy = POLICIES[name]
    caches = [rk.KVCache(policy, 2, 2, 2, 16, 4, 4, dtype=torch.bfloat16, backend="reference", kv_dtype=kv)
              for kv in (None, FP8)]
    gen = torch.Generator().manual_seed(3)
    shape = (2, policy.chunk_frames * 16, 2, 16)
    chose = 0
    for _ in range(10):
        for cache in caches:
            cache.begin_chunk()
        for layer in range(2):
            qkv = [torch.randn(shape, generator=gen).bfloat16() for _ in range(3)]
            for cache in caches:
                cache.attend(layer, *qkv)
        for cache in caches:
            cache.end_chunk()
        chose += caches[0].last_plan.selects
        for layer in range(2):
            assert caches[1].selected_frames(layer) == caches[0].selected_frames(layer)
    assert chose >= 4


@pytest.mark.interpreter
@pytest.mark.parametrize("attention", MODES)
@pytest.mark.parametrize("name", ["relax", "pack"])
def test_triton_kernels_give_the_reference_pools_and_outputs(name, attention):
    """fp16 compute (the interpreter's bf16 is broken): the Triton kernels write the reference's codes (a rare
    code may round the other way where the kernel rotates K in fp32, the reference in float64) and attend
    within fp16 rounding plus such a code."""
    policy = POLICIES[name]
    kw = dict(chunks=6, passes=1, dtype=torch.float16, attention=attention, kv_dtype=FP8)
    want_out, want = cache_rollout(policy, backend="reference", **kw)
    got_out, got = cache_rollout(policy, backend="fused", **kw)
    torch.testing.assert_close(got_out, want_out, rtol=1e-2, atol=1e-2)  # fp16 (2^-11) and one e4m3 step of a row
    assert torch.equal(got.plan_buffers.seg, want.plan_buffers.seg)
    rows = held_rows(want)
    s, w = got.storage, want.storage
    assert_fp8_equal(s.k[:, :, rows], s.k_scale[:, :, rows], w.k[:, :, rows], w.k_scale[:, :, rows], exact=False)
    assert_fp8_equal(s.v[:, :, rows], s.v_scale[:, :, rows], w.v[:, :, rows], w.v_scale[:, :, rows])


@pytest.mark.parametrize("attention", ["window", "segments"])
def test_csrc_kernels_give_the_reference_pools_and_outputs(attention, kernel_device, backend_env):
    """The CUDA kernels (emulated on the CPU, or on the GPU) for every op that has one, fp32 compute."""
    for op in ("ROPE_APPEND", "GATHER_KV_ROPE", "COMPRESS_KV"):
        backend_env(f"RELAXKV_BACKEND_{op}", "cuda")
    policy = POLICIES["pack"]
    kw = dict(chunks=6, passes=1, attention=attention, kv_dtype=FP8, device=kernel_device)
    want_out, want = cache_rollout(policy, backend="reference", **kw)
    got_out, got = cache_rollout(policy, backend="auto", **kw)
    torch.testing.assert_close(got_out, want_out, rtol=1e-2, atol=1e-2)  # one e4m3 step of a rare code
    assert torch.equal(got.plan_buffers.seg, want.plan_buffers.seg)
    rows = held_rows(want).to(kernel_device)
    s, w = got.storage, want.storage
    assert_fp8_equal(s.k[:, :, rows], s.k_scale[:, :, rows], w.k[:, :, rows], w.k_scale[:, :, rows], exact=False)


def test_memory_is_about_half():
    """bf16 compute at Wan2.1-1.3B head size: the pools and their scales take 0.516x the bf16 pools (1 byte per
    element and 4 per row and head of 128 against 2 per element), counted in memory_bytes and live_bytes."""
    for name, policy in POLICIES.items():
        bf16, fp8 = (rk.KVCache(policy, 2, 1, 2, 128, 4, 4, dtype=torch.bfloat16, device="meta", kv_dtype=kv,
                                attention="segments") for kv in (None, FP8))
        assert fp8.pool_bytes() / bf16.pool_bytes() == pytest.approx(0.515625)
        assert bf16.memory_bytes() - fp8.memory_bytes() == bf16.pool_bytes() - fp8.pool_bytes()
        assert fp8.storage.row_bytes() * 256 == bf16.storage.row_bytes() * 132
        assert fp8.kv_dtype == FP8 and bf16.kv_dtype == torch.bfloat16, name


def test_fp8_pools_stage_every_chunk():
    """A dense window without re-rotation attends to the pool directly with bf16 pools; with FP8 pools it stages
    (the engines read the compute dtype), and "auto" on CUDA picks per_call (one shared window) for it."""
    policy = POLICIES["dense"]
    _, bf16 = cache_rollout(policy, chunks=2, backend="reference", attention="window")
    _, fp8 = cache_rollout(policy, chunks=2, backend="reference", attention="window", kv_dtype=FP8)
    assert bf16.active_mode.name == "pool_prefix" and bf16.attention_mode.nbytes() == 0
    assert fp8.active_mode.name == "window" and fp8.attention_mode.nbytes() > 0
    from relaxkv_kernels.cache.modes import resolve_attention

    assert resolve_attention("auto", "auto", "cuda", staged=True, gathers=False) == "per_call"
    assert resolve_attention("auto", "auto", "cuda", staged=True, gathers=True) == "window"
    assert resolve_attention("auto", "auto", "cpu", staged=True, gathers=False) == "segments"


@pytest.mark.parametrize("kv_dtype, exc, match", [
    (torch.float16, TypeError, "kv_dtype: expected None"),
    (torch.float8_e5m2, TypeError, "kv_dtype: expected None"),
    ("fp8", TypeError, "kv_dtype: expected None"),
])
def test_bad_kv_dtype_is_a_named_error(kv_dtype, exc, match):
    with pytest.raises(exc, match=match):
        rk.KVCache(POLICIES["relax"], 1, 1, 2, 16, 4, 4, dtype=torch.bfloat16, kv_dtype=kv_dtype)
    same = rk.KVCache(POLICIES["relax"], 1, 1, 2, 16, 4, 4, dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    assert same.kv_dtype == torch.bfloat16 and not same.storage.fp8


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["relax", "pack"])
def test_fp8_at_wan_shapes_within_the_e4m3_bound(name):
    """One layer at Wan shapes, bf16, fused kernels: FP8 pools against bf16 pools, both against an fp32 reference."""
    policy = {"relax": rk.RelaxMemory(reservoir=30), "pack": rk.PackMemory(top_k=4, archive=8)}[name]
    wan = dict(num_heads=12, head_dim=128, height=30, width=52, device="cuda")
    caches = {"truth": rk.KVCache(policy, 1, 1, dtype=torch.float32, backend="reference", attention="segments", **wan),
              "same": rk.KVCache(policy, 1, 1, dtype=torch.bfloat16, backend="fused", **wan),
              "fp8": rk.KVCache(policy, 1, 1, dtype=torch.bfloat16, backend="fused", kv_dtype=FP8, **wan)}
    gen = torch.Generator(device="cuda").manual_seed(4)
    shape = (1, policy.chunk_frames * 1560, 12, 128)
    outs = {k: [] for k in caches}
    for _ in range(8):
        q, k, v = (torch.randn(shape, generator=gen, device="cuda") for _ in range(3))
        for key, cache in caches.items():
            cache.begin_chunk()
            outs[key].append(cache.attend(0, q.to(cache.dtype), k.to(cache.dtype), v.to(cache.dtype)).float())
            cache.end_chunk()
    truth = torch.stack(outs["truth"])
    err_same, err_fp8 = _rel(torch.stack(outs["same"]), truth), _rel(torch.stack(outs["fp8"]), truth)
    assert err_same < err_fp8 <= 2 * STEP_RATIO * err_same


def _top_binade_rollout(attention: str, backend: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
    """Outputs of a Relax cache with FP8 pools fed keys and values holding the compute dtype's near-largest finite
    value (65000 in fp16, 3.3e38 in fp32) in some rows: 4 chunks of one pass, 2 layers."""
    big = {torch.float16: 65000.0, torch.float32: 3.3e38}[dtype]
    cache = rk.KVCache(POLICIES["relax"], 2, 1, 2, 16, 4, 4, dtype=dtype, device=device, backend=backend,
                       attention=attention, kv_dtype=FP8)
    gen = torch.Generator().manual_seed(8)
    shape = (1, cache.policy.chunk_frames * 16, 2, 16)
    outs = []
    for _ in range(4):
        cache.begin_chunk()
        for layer in range(2):
            q = torch.randn(shape, generator=gen) / 64
            k, v = (torch.randn(shape, generator=gen) for _ in range(2))
            k[:, ::5, :, 0], v[:, ::7, :, 1] = big, -big  # a large key and value in every few rows
            outs.append(cache.attend(layer, *(t.to(device, dtype) for t in (q, k, v))))
        cache.end_chunk()
    return torch.stack(outs).float().cpu()


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
@pytest.mark.parametrize("attention", MODES)
def test_a_finite_input_stays_finite_through_fp8_pools(attention, dtype):
    """65000 in fp16 (finite) used to be stored with a power-of-two scale as 256 * 2^8 = 65536, inf in the window
    (every output non-finite in per_call mode); 3.3e38 in fp32 as 2^128. The codes now saturate below the compute
    dtype's largest finite value (ops/fp8.py), on the reference and the Triton kernels (interpreter) alike."""
    backends = ["reference", "fused"] if dtype == torch.float16 else ["reference"]  # interpreter: fp16 / fp32
    for backend in backends:
        out = _top_binade_rollout(attention, backend, dtype)
        assert bool(out.isfinite().all()), (attention, backend, int((~out.isfinite()).sum()))


def test_csrc_kernels_keep_a_finite_input_finite(kernel_device, backend_env):
    """The same with the CUDA kernels (emulated on the CPU, or on the GPU) writing the FP8 pools."""
    for op in ("ROPE_APPEND", "GATHER_KV_ROPE", "COMPRESS_KV"):
        backend_env(f"RELAXKV_BACKEND_{op}", "cuda")
    out = _top_binade_rollout("segments", "auto", torch.float16, device=kernel_device)
    assert bool(out.isfinite().all()), int((~out.isfinite()).sum())
