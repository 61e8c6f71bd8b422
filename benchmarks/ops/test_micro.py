"""Microbenchmarks of every op (pytest-benchmark), and an end-to-end run of the benchmark scripts.

    python -m benchmarks micro -m gpu                      # Wan2.1 shapes on a GPU, timed
    python -m benchmarks micro --benchmark-disable         # CPU smoke: every op once at tiny shapes

The ``*_wan`` tests (marked ``gpu``) use one steady-state chunk at Wan2.1-1.3B shapes (B=1, H=12, D=128,
30x52 grid, bf16) built by ``bench_chunk.build_setup``; the ``*_smoke`` tests run the same code at
tiny CPU shapes (fp32, 2 heads, 4x4 grid), so CI checks the harness, not the speed. The last tests
run ``bench_chunk.py``, ``bench_scaling.py`` and ``plot_results.py`` at tiny settings into a
temporary directory and check what they write.
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import relaxkv_kernels as rk
from benchmarks import common
from benchmarks.chunk import bench_chunk
from benchmarks.chunk import bench_scaling
from benchmarks.plots import plot_results
from relaxkv_kernels.ops.compress_kv.op import BACKENDS as COMPRESS_KV_BACKENDS
from relaxkv_kernels.ops.gather_kv_rope.op import BACKENDS as GATHER_KV_ROPE_BACKENDS
from relaxkv_kernels.ops.mid_select.op import BACKENDS as MID_SELECT_BACKENDS
from relaxkv_kernels.ops.relax_select.op import BACKENDS as RELAX_SELECT_BACKENDS
from relaxkv_kernels.ops.rope_append.op import BACKENDS as ROPE_APPEND_BACKENDS
from relaxkv_kernels.ops.sparse_kv_attention.op import BACKENDS as SPARSE_KV_ATTENTION_BACKENDS

_SETUPS: dict = {}
BACKEND_TABLES = {  # op -> its backend table (relaxkv_kernels/ops/<op>/op.py)
    "rope_append": ROPE_APPEND_BACKENDS,
    "gather_kv_rope": GATHER_KV_ROPE_BACKENDS,
    "sparse_kv_attention": SPARSE_KV_ATTENTION_BACKENDS,
    "relax_select": RELAX_SELECT_BACKENDS,
    "mid_select": MID_SELECT_BACKENDS,
    "compress_kv": COMPRESS_KV_BACKENDS,
}


@dataclasses.dataclass
class OpSetup:
    """One steady-state chunk of a config (one layer, one pass): the chunk's q/k/v, a cache with its plan
    uploaded and the selections of the chunk written into its segment tables (reference ops)."""

    su: bench_chunk.ChunkSetup
    cache: object

    @property
    def device(self):
        return self.su.device


def setup_for(config: str, size: str) -> OpSetup:
    """Built once per session and size."""
    key = (config, size)
    if key not in _SETUPS:
        device = torch.device("cuda") if size == "wan" else torch.device("cpu")
        su = bench_chunk.build_setup(config, common.shape_from_args(size, layers=1, passes=1), device)
        cache = su.cache(backend="reference", attention="segments")
        plan = cache.begin_chunk()  # runs a chunk-level selection (Relax)
        if plan.selects and cache.planner.selection == "per_layer":
            cache.planner.select_layer(cache.step_context(0), su.qkv[0])
        _SETUPS[key] = OpSetup(su, cache)
    return _SETUPS[key]


def need_backend(op: str, device: torch.device, backend: str) -> None:
    """Skip unless ``backend`` can run ``op`` on ``device`` (the op's backend table decides)."""
    try:
        BACKEND_TABLES[op].resolve(device, backend)
    except RuntimeError as exc:
        pytest.skip(str(exc))


def timed(device: torch.device, fn):
    """fn followed by a device sync, so pytest-benchmark's host timer sees the whole kernel."""
    def run():
        out = fn()
        common.synchronize(device)
        return out
    return run


# ----------------------------------------------------------------------------------------------------
# one function per op; the benchmark tests below call them at tiny (CPU) and Wan (GPU) shapes


def op_rope_append(o: OpSetup, backend):
    (q, k, v), st, d, s = o.su.qkv, o.cache.storage, o.cache.plan_buffers, o.su.shape
    return lambda: rk.rope_append(q, k, v, st.k[0], st.v[0], st.proto, d.frame_slot, d.frame_pos, s.height, s.width,
                                  backend=backend)


def op_sparse_kv_attention(o: OpSetup, backend):
    q, st, seg = o.su.qkv[0], o.cache.storage, o.cache.step_context(0).seg
    return lambda: rk.sparse_kv_attention(q, st.k[0], st.v[0], seg, backend=backend, impl="fused")


def op_gather_kv_rope(o: OpSetup, backend):
    st, seg = o.cache.storage, o.cache.step_context(0).seg
    return lambda: rk.gather_kv_rope(st.k[0], st.v[0], seg, o.su.nk, backend=backend)


def op_relax_select(o: OpSetup, backend):
    step, p = o.cache.step_context(None), o.su.policy
    i, seg = step.index, step.seg.clone()
    return lambda: rk.relax_select(step.proto, i.slot_pos, i.sink_slots, i.tail_slots, i.cand_slots, seg,
                                   i.seg_index, i.target_pos, o.su.shape.frame_tokens, p.lam, p.batch0_decides,
                                   p.contiguous_rope, backend=backend)


def op_mid_select(o: OpSetup, backend):
    step, pl = o.cache.step_context(0), o.cache.planner
    i, q, seg = step.index, o.su.qkv[0], step.seg.clone()
    return lambda: rk.mid_select(q, step.state["mean_key"], i.mid_slots, i.block_pos, seg, i.seg_index,
                                 i.mid_target_pos, pl.row0, pl.block_tokens, min(o.su.policy.q_stride, q.shape[1]),
                                 o.su.policy.batch_mean, backend=backend)


def op_compress_kv(o: OpSetup, backend):
    (_, k, v), step, s = o.su.qkv, o.cache.step_context(0), o.su.shape
    return lambda: rk.compress_kv(k, v, step.k_pool, step.v_pool, step.state["mean_key"], step.index.block_slot,
                                  step.index.block_t0, o.cache.planner.row0, o.su.policy.block_frames, s.height,
                                  s.width, backend=backend)


CASES = [  # (op, config whose steady-state chunk feeds it)
    ("rope_append", "dense"),
    ("gather_kv_rope", "relax"),
    ("gather_kv_rope", "pack"),
    ("sparse_kv_attention", "dense"),
    ("sparse_kv_attention", "relax"),
    ("sparse_kv_attention", "pack"),
    ("relax_select", "relax"),
    ("mid_select", "pack"),
    ("compress_kv", "pack"),
]
CASE_IDS = [f"{op}-{config}" for op, config in CASES]


def run_case(benchmark, op: str, config: str, size: str, backend: str):
    o = setup_for(config, size)
    need_backend(op, o.device, backend)
    fn = timed(o.device, globals()[f"op_{op}"](o, backend))
    benchmark.extra_info.update(op=op, config=config, shape=size, backend=backend, device=str(o.device),
                                nq=o.su.nq, nk=o.su.nk, cpu_timing=o.device.type != "cuda")
    benchmark(fn)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "triton", "cuda", "auto"])
@pytest.mark.parametrize(("op", "config"), CASES, ids=CASE_IDS)
def test_op_wan(benchmark, op, config, backend):
    run_case(benchmark, op, config, "wan", backend)


# The interpreter is slow (about 1 s per attention call at these sizes): Triton attention runs on the relax chunk only.
SMOKE = [(op, config, "reference") for op, config in CASES] + [
    (op, config, "triton") for op, config in CASES if not (op == "sparse_kv_attention" and config != "relax")]


@pytest.mark.benchmark(min_rounds=1, max_time=0.05, warmup=False)
@pytest.mark.parametrize(("op", "config", "backend"), SMOKE, ids=[f"{o}-{c}-{b}" for o, c, b in SMOKE])
def test_op_smoke(benchmark, op, config, backend):
    if torch.cuda.is_available() and backend == "triton":
        pytest.skip("smoke variant is for CPU-only machines; the GPU runs test_op_wan")
    run_case(benchmark, op, config, "tiny", backend)


# ----------------------------------------------------------------------------------------------------
# the scripts end to end, at tiny settings


TINY = ["--shapes", "tiny", "--reps", "1", "--warmup", "0", "--peak-n", "128", "--no-progress"]


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """bench_chunk (all configs; the Triton engine on relax only: the interpreter is slow) and bench_scaling."""
    if torch.cuda.is_available():
        pytest.skip("the tiny end-to-end run is the CPU check; on a GPU run the scripts at Wan shapes")
    tmp = tmp_path_factory.mktemp("bench")
    chunk = bench_chunk.main(TINY + ["--out", str(tmp / "chunk.json")])
    triton_rows = bench_chunk.main(TINY + ["--configs", "relax", "--engines", "triton", "--layers", "1",
                                           "--passes", "1", "--skip-official", "--kv-dtype", "fp8", "--pools", "host",
                                           "--staging", "first_call,all_layers",
                                           "--out", str(tmp / "chunk_triton.json")])
    scaling = bench_scaling.main(["--shapes", "tiny", "--seconds", "1,2", "--layers", "1", "--passes", "1",
                                  "--no-progress", "--out", str(tmp / "scaling.json")])
    return tmp, chunk, triton_rows, scaling


def test_bench_chunk_rows(outputs):
    tmp, chunk, triton_rows, _ = outputs
    data = json.loads((tmp / "chunk.json").read_text())
    assert data["env"]["cpu_timing"] is True and data["peak_bf16"]["cpu_timing"] is True
    assert "label" in data["peak_bf16"]
    for key in ("device", "torch", "triton", "commit", "date"):
        assert data["env"][key], key
    rows = {(r["config"], r["row"]): r for r in data["rows"]}
    common_rows = ["official", "step[window:sdpa]", "step[per_call:sdpa]", "step[segments]", "append"]
    expected = {c: common_rows + (["stage", "select"] if c != "dense" else []) for c in ("dense", "relax", "pack")}
    assert set(rows) == {(c, r) for c, names in expected.items() for r in names}
    for r in data["rows"]:
        assert r["status"] == "ok", r
        assert r["cpu_timing"] is True
        assert r["ms_per_chunk"] > 0
        if r["kind"] in ("official", "step"):
            assert r["flop"] == 4 * r["nq"] * r["nk"] * 2 * 32 * 2 * 2 and r["tflops"] > 0
    setups = {s["config"]: s for s in data["setups"]}  # tiny steady state: 4x4 grid, Nc = 2 tokens per mid block
    assert (setups["dense"]["nq"], setups["dense"]["nk"]) == (48, 21 * 16)
    assert (setups["relax"]["nq"], setups["relax"]["nk"]) == (48, 7 * 16)
    assert (setups["pack"]["nq"], setups["pack"]["nk"]) == (64, 16 * 16 + 16 * 2)
    # the window costs memory only where keys are gathered (relax, pack), the per-call window less
    by = {(r["config"], r["row"]): r.get("kv_bytes") for r in data["rows"]}
    assert by[("dense", "step[window:sdpa]")] == by[("dense", "step[segments]")]
    for c in ("relax", "pack"):
        assert by[(c, "step[window:sdpa]")] > by[(c, "step[per_call:sdpa]")] > by[(c, "step[segments]")]
    assert {g["config"] for g in data["targets"]} == {"dense", "relax", "pack", "dense/relax"}
    assert (tmp / "chunk.csv").read_text().count("\n") == len(data["rows"]) + 1
    triton_data = json.loads((tmp / "chunk_triton.json").read_text())
    trows = {r["row"]: r for r in triton_data["rows"]}
    assert trows["step[window:triton]"]["status"] == "ok" and trows["step[window:triton]"]["engine"] == "triton"
    # --kv-dtype fp8: the FP8-pool step in the window mode, its staging and the copy of the same bytes
    fp8 = trows["step[window:triton]+fp8"]
    assert fp8["status"] == "ok" and fp8["kv_dtype"] == "float8_e4m3fn"
    assert fp8["kv_bytes"] < trows["step[window:triton]"]["kv_bytes"]
    assert trows["stage_fp8"]["gbps"] > 0 and trows["copy_fp8"]["gbps"] > 0
    assert triton_data["targets"][0]["target_fp8_over_bf16"] == 1.03 and triton_data["targets"][0]["fp8_over_bf16"]
    # --pools host: the window step with host pools (the pools counted off the device), its staging and the copy
    host = trows["step[window:triton]+host"]
    assert host["status"] == "ok" and host["pools"] == "host" and trows["step[window:triton]"]["pools"] == "device"
    assert host["device_bytes"] < host["kv_bytes"] == trows["step[window:triton]"]["kv_bytes"]
    assert trows["stage_host"]["gbps_host_read"] > 0 and trows["copy_h2d"]["gbps"] > 0
    goal = triton_data["targets"][0]
    assert goal["target_host_over_device"] == 1.05 and goal["host_over_device"] and goal["stage_over_copy"] > 0
    # --staging: a host-pool step per staging, the targets naming each one's time and the fastest
    ahead = trows["step[window:triton]+host+all_layers"]
    assert ahead["status"] == "ok" and ahead["staging"] == "all_layers" and host["staging"] == "first_call"
    assert set(goal["host_ms_by_staging"]) == {"first_call", "all_layers"}
    assert goal["host_step_ms"] == min(goal["host_ms_by_staging"].values())
    assert goal["host_ms_by_staging"][goal["host_best_staging"]] == goal["host_step_ms"]


def test_bench_scaling_rows(outputs):
    tmp, _, _, scaling = outputs
    data = json.loads((tmp / "scaling.json").read_text())
    assert data["env"]["cpu_timing"] is True
    got = {(r["policy"], r["seconds"]) for r in data["rows"]}
    assert got == {(p, s) for p in bench_scaling.POLICIES for s in (1.0, 2.0)}
    for r in data["rows"]:
        assert r["status"] == "ok" and r["cpu_timing"] is True and r["ms_per_chunk"] > 0
        assert r["chunks"] == -(-int(4 * r["seconds"]) // r["chunk_frames"])
    by = {(r["policy"], r["seconds"]): r for r in data["rows"]}
    assert by[("dense21", 2.0)]["wan30_kv_gib_computed"] < by[("relax", 2.0)]["wan30_kv_gib_computed"]
    assert (tmp / "scaling.png").stat().st_size > 0


def test_plot_results(outputs, tmp_path):
    tmp = outputs[0]
    table, pngs = plot_results.render([tmp / "chunk.json", tmp / "scaling.json"], tmp_path / "TABLE.md")
    text = table.read_text()
    assert common.CPU_LABEL in text and "| dense |" in text and "| relax |" in text
    assert [p.name for p in pngs] == ["chunk.png", "scaling.png"] and all(p.stat().st_size > 0 for p in pngs)
