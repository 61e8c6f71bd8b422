"""Compile-time guards (no GPU needed): the window path's Triton launches compile for sm_80, sm_90a and sm_120 within
their limits and without spilling; every csrc/ kernel builds for sm_90a without spilling, and the 16-byte paths of the
CUDA kernels compile to 128-bit accesses."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.reports import cuda_resource_report as crr

ROOT = Path(__file__).resolve().parents[2]


def test_window_path_compiles_for_every_kind_of_target(tmp_path):
    """target_report.py's fast subset: Relax's window path (bf16 and FP8 pools) for sm_80 (no FP8 units: codes
    decoded in software), sm_90a (wgmma) and sm_120 (99 KiB of shared memory, 128-register pressure): every launch
    compiles, kept configs fit, nothing spills in the hot path. The full matrix is the script's default run."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the jitted kernels
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = tmp_path / "targets.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.reports.target_report", "--targets",
                           "sm_80,sm_90a,sm_120", "--policies", "relax", "--modes", "window", "--chunks", "2",
                           "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["target"] for r in rows} == {"sm_80", "sm_90a", "sm_120"} and all(r["compiled"] for r in rows)
    hot = {r["kernel"] for r in rows if r["hot"]}
    assert {"_gather_kv_rope_kernel", "_rope_append_kernel", "_quantize_frames_kernel",
            "_sparse_kv_attention_kernel"} <= hot
    attention = [r for r in rows if r["kernel"] == "_sparse_kv_attention_kernel"]
    assert not any(r["kept"] and r["smem"] > 99 * 1024 for r in attention if r["target"] == "sm_120")
    main = [r for r in attention if r["target"] == "sm_90a" and r["config"] == "M128N64 w8 s3"]
    assert main and all(r["kept"] and r["cp_async"] and r["wgmma"] for r in main)  # pipelined, Hopper tensor cores


def test_cuda_kernels_do_not_spill_and_vector_paths_are_16_byte():
    if crr.find_nvcc() is None:
        pytest.skip("nvcc not found")
    rows = crr.report("sm_90a")
    assert {r["source"] for r in rows} == {p.name for p in (ROOT / "csrc").glob("*.cu")}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["stack"] <= 32, r  # sincosf's slow-path range reduction; more means a local array
        if r["vector"]:
            assert r["ld_v4"] >= 1, r
    gathers = [r for r in rows if r["kernel"].startswith("gather_kv_rope_kernel") and r["vector"]]
    # K and V rows stored 16 B wide: 3 output dtypes x pools in the compute dtype or FP8
    assert len(gathers) == 6 and all(r["st_v4"] >= 2 for r in gathers), gathers
    appends = [r for r in rows if r["kernel"].startswith("rope_append_kernel") and r["vector"]]
    # q, k, v read and q_rot, k_cache, v_cache written 16 B wide
    assert len(appends) == 3 and all(r["ld_v4"] >= 3 and r["st_v4"] >= 3 for r in appends), appends
