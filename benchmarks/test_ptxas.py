"""Compile-time guard (no GPU needed): the main attention config builds for sm_90a without spilling."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def test_attention_main_config_does_not_spill():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile the jitted kernels
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "ptxas_report.py"), "--max-stack", "64"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
    main = proc.stdout.splitlines()[1]
    assert "cp.async True" in main and "wgmma True" in main  # pipelined loads, Hopper tensor cores
