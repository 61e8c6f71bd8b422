"""bench_stream.py at a CPU smoke size: a stream's memory stays constant, the JSON holds what it
reports (the timing ratio is a CPU-time figure, checked for presence only)."""
import json

from benchmarks.end_to_end import bench_stream


def test_stream_bench_rows(tmp_path):
    out = bench_stream.main(["--policies", "dense", "--chunks", "24", "--window", "5", "--no-progress",
                             "--out", str(tmp_path / "stream.json")])
    data = json.loads((tmp_path / "stream.json").read_text())
    (row,) = data["rows"]
    assert row["policy"] == "dense" and row["chunks"] == 24 and row["memory_constant"]
    assert row["live_constant_from"] == 6  # chunk 6 fills the 21-frame window (7 chunks of 3)
    assert 0 < row["first_steady"] < 24 - 2 * 5 and row["late_over_early"] > 0
    assert data["env"]["cpu_timing"] and out["targets"][0]["target"] == bench_stream.TARGET
