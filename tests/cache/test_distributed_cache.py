"""Head-parallel KVCache (``process_group=``) over torch.distributed with real processes (gloo on the CPU, spawned
here): every rank's outputs are its heads of the single-process outputs, every rank chooses the same frames as the
single-process cache, each rank holds 1/P of the pools, and failures are named on every rank instead of hanging.

Each worker runs a single-process cache (all heads) beside its head-parallel one on the same inputs (drawn from a
generator seeded alike on every rank) and reports what it saw to the test.
"""
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

import relaxkv_kernels as rk

from helpers import spawn_ranks

L, B, H, D, HH, WW = 2, 2, 4, 16, 4, 4  # 4 heads: P = 2 and 4; frames of 16 tokens (Pack pools 2x4x4)
CHUNKS, PASSES = 9, 2  # past the dense window, Relax's warm-up and evictions, Pack's first mid blocks (chunk 4)
POLICIES = {
    "dense": lambda: rk.DenseWindow(window=9),
    "relax": lambda: rk.RelaxMemory(reservoir=30),
    "pack": lambda: rk.PackMemory(top_k=2, archive=3, q_stride=2),
}


def _run(world: int, worker, tmp_path, *args, timeout: float = 120) -> list[dict]:
    """``worker(rank, world, store, results, *args)`` on ``world`` spawned processes (``helpers.spawn_ranks``);
    every rank's result."""
    return spawn_ranks(worker, world, tmp_path, *args, timeout=timeout)[0]


def _init(rank: int, world: int, store: str, backend: str = "gloo") -> None:
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))


def _rollout_worker(rank, world, store, results, names, attention, fail_at, kv_dtype=None, pool_device=None):
    """For each policy: single-process and head-parallel caches side by side (pools in ``kv_dtype``, the head-parallel
    one's on ``pool_device``); per chunk the largest output difference on this rank's heads and both tables' frames.
    ``fail_at``: rank 1 raises before that chunk."""
    _init(rank, world, store)
    result = {}
    try:
        heads = slice(rank * H // world, (rank + 1) * H // world)
        for name in names:
            single = rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference",
                                attention=attention, kv_dtype=kv_dtype)
            shard = rk.KVCache(POLICIES[name](), L, B, H, D, HH, WW, dtype=torch.float32, backend="reference",
                               attention=attention, process_group=dist.group.WORLD, kv_dtype=kv_dtype,
                               pool_device=pool_device)
            gen = torch.Generator().manual_seed(7)
            shape = (B, single.policy.chunk_frames * HH * WW, H, D)
            worst, frames, same = 0.0, [], True
            for chunk in range(CHUNKS):
                if chunk == fail_at and rank == 1:
                    raise ValueError("injected failure on rank 1")
                single.begin_chunk()
                shard.begin_chunk()
                for _ in range(PASSES):
                    for layer in range(L):
                        q, k, v = (torch.randn(shape, generator=gen) for _ in range(3))
                        want = single.attend(layer, q, k, v)[:, :, heads]
                        got = shard.attend(layer, q[:, :, heads], k[:, :, heads], v[:, :, heads])
                        worst = max(worst, (got - want).abs().max().item())
                single.end_chunk()
                shard.end_chunk()
                tables = [shard.selected_frames(layer) for layer in range(L)]
                same &= tables == [single.selected_frames(layer) for layer in range(L)]
                frames.append(tables)
            result[name] = {"worst": worst, "frames": frames, "same_as_single": same,
                            "pool_ratio": single.storage.k.numel() / shard.storage.k.numel(),
                            "num_heads": shard.num_heads, "selects": shard.last_plan.selects,
                            "host_bytes": shard.host_bytes(), "pool_bytes": shard.pool_bytes()}
    except Exception as exc:  # reported to the test; the process ends, which closes its connections
        result["error"] = f"{type(exc).__name__}: {exc}"
    results.put((rank, result))
    if "error" not in result:
        dist.destroy_process_group()


@pytest.mark.parametrize("world, names, attention, kv_dtype, pool_device", [
    (2, ("dense", "relax", "pack"), "segments", None, None),
    (2, ("relax", "pack"), "window", None, None),
    (4, ("relax", "pack"), "segments", None, None),
    (2, ("relax", "pack"), "window", torch.float8_e4m3fn, None),  # scales per row and head: sharded like the pools
    (2, ("dense", "relax", "pack"), "window", torch.float8_e4m3fn, "cpu"),  # each rank's heads in host memory
], ids=["P2-segments", "P2-window", "P4-segments", "P2-window-fp8", "P2-window-fp8-host"])
def test_head_parallel_caches_match_the_single_process_cache(tmp_path, world, names, attention, kv_dtype,
                                                             pool_device):
    results = _run(world, _rollout_worker, tmp_path, names, attention, -1, kv_dtype, pool_device)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank}: {result['error']}"
        for name in names:
            r = result[name]
            assert r["worst"] <= 1e-5, (rank, name, r["worst"])  # same math per head: rounding of other batching
            assert r["same_as_single"], (rank, name)
            assert r["frames"] == results[0][name]["frames"], (rank, name)  # every rank chose the same frames
            assert r["pool_ratio"] == world and r["num_heads"] == H // world
            assert r["selects"] == (name != "dense")  # the selections ran (steady state reached)
            assert r["host_bytes"] == (r["pool_bytes"] if pool_device else 0)


def test_a_rank_that_fails_ends_every_rank_with_a_named_error(tmp_path):
    """Rank 1 raises before chunk 3 and exits; rank 0, waiting in Relax's all_reduce of that chunk's prototypes,
    gets a CollectiveError naming itself and the collective within seconds (no 60 s timeout, no hang)."""
    start = time.monotonic()
    results = _run(2, _rollout_worker, tmp_path, ("relax",), "segments", 3, timeout=60)
    assert time.monotonic() - start < 45
    assert results[1]["error"] == "ValueError: injected failure on rank 1"
    assert results[0]["error"].startswith("CollectiveError: rank 0 of 2: KVCache all_reduce (prototypes) failed "
                                          "(another rank stopped?): "), results[0]["error"]


def _heads_worker(rank, world, store, results, num_heads):
    _init(rank, world, store)
    try:
        rk.KVCache(rk.RelaxMemory(), L, B, num_heads, D, HH, WW, dtype=torch.float32, process_group=dist.group.WORLD)
        result = {}
    except ValueError as exc:
        result = {"error": str(exc)}
    results.put((rank, result))
    # the check runs no collective: without this, a rank could leave while the other is still connecting in
    # init_process_group (under load: "connection closed by peer" there, and no result until the timeout)
    dist.barrier()
    dist.destroy_process_group()


def test_heads_not_divisible_by_the_ranks_is_a_named_error_on_every_rank(tmp_path):
    results = _run(2, _heads_worker, tmp_path, 3)
    for result in results:
        assert result["error"] == ("KVCache: num_heads 3 is not divisible by the 2 ranks of process_group (each "
                                   "rank holds num_heads / P heads)")


def _mismatch_worker(rank, world, store, results, settings):
    """Rank r makes a cache with ``settings[r]`` (policy name and KVCache keywords); reports the error, if any."""
    _init(rank, world, store)
    name, kw = settings[rank]
    try:
        rk.KVCache(POLICIES[name](), L, B, kw.pop("num_heads", H), D, HH, WW, dtype=torch.float32,
                   process_group=dist.group.WORLD, **kw)
        result = {}
    except ValueError as exc:
        result = {"error": str(exc)}
    results.put((rank, result))
    dist.destroy_process_group()


@pytest.mark.parametrize("settings, differ", [
    ((("relax", {}), ("pack", {})), "policy"),
    ((("relax", {}), ("relax", {"num_heads": 2})), "geometry"),
    ((("relax", {}), ("relax", {"pool_device": "cpu"})), "pool_device"),
    ((("pack", {"kv_dtype": torch.float8_e4m3fn}), ("pack", {})), "kv_dtype"),
], ids=["policy", "heads", "pools", "kv_dtype"])
def test_ranks_that_make_different_caches_get_a_named_error_at_construction(tmp_path, settings, differ):
    """One collective at construction: every rank names what differs, within seconds (no hang in the first
    selection, no prototypes averaged over mismatched heads)."""
    start = time.monotonic()
    results = _run(2, _mismatch_worker, tmp_path, settings, timeout=60)
    assert time.monotonic() - start < 45
    for result in results:
        assert result["error"].startswith(f"KVCache: process_group: every rank must make the same cache, but the "
                                          f"ranks differ in {differ} ("), result
    assert results[0] == results[1]


def test_process_group_without_torch_distributed_is_a_named_error():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="process_group: torch.distributed is not initialised"):
        rk.KVCache(rk.RelaxMemory(), L, B, H, D, HH, WW, dtype=torch.float32, process_group=object())


def _nccl_graph_worker(rank, world, store, results, name):
    """NCCL with P = 1 (the collectives still run): a chunk step of head-parallel caches captured in a CUDA graph and
    replayed against eager (both caches head-parallel, the same kernels: bitwise)."""
    from helpers import assert_graph_replays_chunk_steps

    torch.cuda.set_device(0)
    _init(rank, world, store, "nccl")
    result = {}
    try:
        make = lambda: rk.KVCache(POLICIES[name](), L, B, H, 64, HH, WW, dtype=torch.bfloat16,  # noqa: E731
                                  device="cuda", backend="fused", process_group=dist.group.WORLD)
        eager, graphed = make(), make()
        gen = torch.Generator(device="cuda").manual_seed(1)
        shape = (B, eager.policy.chunk_frames * HH * WW, H, 64)

        def inputs():
            return [tuple(torch.randn(shape, generator=gen, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                    for _ in range(L)]

        def step(cache, qkv):
            return [cache.attend(layer, *qkv[layer]) for _ in range(PASSES) for layer in range(L)]

        assert_graph_replays_chunk_steps(eager, graphed, step, inputs, warmup=CHUNKS, chunks=3)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    results.put((rank, result))
    dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.cuda_graph
@pytest.mark.parametrize("name", ["relax", "pack"])
def test_nccl_chunk_step_is_captured_in_a_cuda_graph(tmp_path, name):
    (result,) = _run(1, _nccl_graph_worker, tmp_path, name)
    assert "error" not in result, result["error"]
