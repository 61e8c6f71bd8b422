"""bench_rope_append.py end to end at tiny shapes (on CPU: CPU time, the Triton rows interpreted)."""
import json

import torch

from benchmarks import common
from benchmarks.ops import bench_rope_append


def test_bench_rope_append_tiny_writes_labelled_rows(tmp_path, capsys):
    out = tmp_path / "rope_append.json"
    assert bench_rope_append.main(["--shapes", "tiny", "--frames", "2", "--cache-frames", "5", "--budget-s", "1",
                                   "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert out.with_suffix(".csv").exists()
    rows = {r["row"]: r for r in data["rows"]}
    names = [f"{b}{p}" for b in bench_rope_append.BACKEND_NAMES for p in ("", " +proto")]
    assert list(rows) == ["copy", *names]
    s = common.SHAPES["tiny"]
    assert data["floor"]["bytes_per_call"] == 6 * 2 * s.frame_tokens * s.heads * s.head_dim * 4
    assert rows["copy"]["fraction_of_copy"] == 1.0 and rows["copy"]["gbps"] > 0
    cpu = not torch.cuda.is_available()
    assert data["env"]["cpu_timing"] is cpu
    if cpu:
        assert data["label"] == common.CPU_LABEL and common.CPU_LABEL in capsys.readouterr().out
        assert "skipped" in rows["cuda"] and rows["auto"]["backend"] == "reference"
    for name in names:
        r = rows[name]
        if "skipped" in r:
            continue
        assert r["ms"] > 0 and r["gbps"] > 0 and r["chunk_ms"] > 0
        assert abs(r["fraction_of_copy"] - r["gbps"] / rows["copy"]["gbps"]) < 1e-9
        assert r["max_diff"] < 1e-4, r  # fp32: every backend writes what the reference writes
    assert "skipped" not in rows["triton"] and "skipped" not in rows["triton +proto"]
    assert [t["row"] for t in data["targets"]] == [n for n in ("cuda", "auto") if "skipped" not in rows[n]]
    for goal in data["targets"]:
        assert goal["met"] == (rows[goal["row"]]["fraction_of_copy"] >= 0.6)
