"""Compile-time guards (no GPU needed): the main attention config and every csrc/ kernel build for sm_90a
without spilling, and the 16-byte paths of the CUDA kernels compile to 128-bit accesses."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_attention_main_config_does_not_spill():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the jitted kernels
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptxas_report.py"), "--max-stack", "64"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    fp8_main = next(line for line in lines if line.startswith("fp8 "))  # the first config with FP8 pools
    for main in (lines[1], fp8_main):
        assert "cp.async True" in main and "wgmma True" in main  # pipelined loads, Hopper tensor cores


def test_cuda_kernels_do_not_spill_and_vector_paths_are_16_byte():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cuda_resource_report as crr

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
