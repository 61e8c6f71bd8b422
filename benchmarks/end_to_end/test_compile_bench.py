"""bench_compile.py end to end on the tiny preset, one policy, aot_eager (same ops as eager: flows equal
bitwise), one steady chunk (~10 s): the graph count stops at the warm-up and the JSON / CSV carry the fields the
script's docstring lists."""
import json

from benchmarks import common
from benchmarks.end_to_end import bench_compile


def test_bench_compile_runs_and_writes_its_fields(tmp_path, capsys):
    out = tmp_path / "compile.json"
    data = bench_compile.main(["--backend", "aot_eager", "--policies", "relax", "--chunks", "1", "--min-warmup", "3",
                               "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(data, default=str))
    assert out.with_suffix(".csv").exists()
    assert data["env"]["cpu_timing"] is True and common.CPU_LABEL in data["label"]
    (row,) = data["rows"]
    assert row["policy"] == "relax" and row["compile_backend"] == "aot_eager" and row["passes"] == 5
    assert len(row["graphs_per_chunk"]) == row["warmup_chunks"] + 1 and row["graphs_after_warmup"] == 0
    assert 1 <= row["graphs"] <= 6 and row["max_rel_diff"] == 0.0 and row["same_selection"] is True
    assert row["eager_ms"] > 0 and row["compiled_ms"] > 0 and row["ratio"] == row["compiled_ms"] / row["eager_ms"]
    assert bench_compile.LABEL in capsys.readouterr().out
