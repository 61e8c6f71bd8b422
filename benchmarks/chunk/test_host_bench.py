"""bench_host.py end to end at 2 layers x 2 passes, 2 steady chunks, one round, no baseline (~6 s, most of
it the worker subprocess importing torch): the worker imports this tree, every policy and mode runs on meta
tensors past its warm-up, and the JSON / CSV carry the fields the README lists."""
import json

from benchmarks import common
from benchmarks.chunk import bench_host

WARMUP = {"dense": 6, "relax": 4, "pack": 67}  # first steady-shape chunk at Wan shapes (test_generator_bench.py)


def test_bench_host_runs_and_writes_its_fields(tmp_path, capsys):
    out = tmp_path / "host.json"
    bench_host.main(["--layers", "2", "--passes", "2", "--chunks", "2", "--rounds", "1", "--out", str(out)])
    data = json.loads(out.read_text())
    assert out.with_suffix(".csv").exists()
    env = data["env"]
    assert env["device"] == "meta/host" and env["cpu_timing"] is True and env["cpu_model"]
    assert {"python", "torch", "commit", "date"} <= set(env)
    assert data["label"] == bench_host.LABEL and common.CPU_LABEL in data["label"]
    assert data["shape"]["layers"] == 2 and data["shape"]["passes"] == 2 and data["shape"]["dtype"] == "bfloat16"
    assert "comparison" not in data and [t["name"] for t in data["trees"]] == ["this"]
    tree = data["trees"][0]
    assert tree["commit"] == common.git_commit() and tree["warmup"] == WARMUP, tree
    assert tree["warmup_source"] == dict.fromkeys(WARMUP, "planner")  # the planner search reads this tree's plans
    assert tree["rk_file"] == str(common.REPO_DIR / "relaxkv_kernels" / "__init__.py")  # this tree was measured
    rows = data["rows"]
    assert [(r["policy"], r["mode"]) for r in rows] == [(p, m) for p in bench_host.POLICIES for m in bench_host.MODES]
    for r in rows:
        assert "error" not in r, r  # every policy and mode runs on meta tensors
        assert r["steady_plans"] is True and r["warmup_chunks"] == WARMUP[r["policy"]] and r["steady_chunks"] == 2
        assert r["attend_n"] == 2 * 2 * 2 and r["begin_chunk_n"] == r["end_chunk_n"] == r["chunk_n"] == 2
        for metric in bench_host.METRICS:
            assert 0 < r[f"{metric}_p10_us"] <= r[f"{metric}_median_us"] <= r[f"{metric}_p90_us"], (metric, r)
        assert r["chunk_median_us"] > r["begin_chunk_median_us"] and len(r["rounds"]) == 1
    printed = capsys.readouterr().out
    assert bench_host.LABEL in printed and "pack/per_call" in printed


def test_comparison_ratios_and_table(capsys):
    """--baseline's statistics and table on made-up samples (the worktree path itself runs only from the CLI)."""

    def run(scale):
        samples = {m: [int(scale * 1000 * (i + 1)) for i in range(5)] for m in bench_host.METRICS}
        return {"samples_ns": samples, "steady_plans": True, "backend": "auto", "attention": "window"}

    def tree(name):
        return {"name": name, "commit": name, "warmup": {"relax": 4}}

    this = bench_host.summarise(tree("this"), {"relax/window": [run(2), run(2)]})
    base = bench_host.summarise(tree("REV"), {"relax/window": [run(1), run(1)]})
    assert this[0]["attend_median_us"] == 6.0 and this[0]["attend_n"] == 10 and this[0]["steady_chunks"] == 10
    rows = bench_host.compare(this, base)
    assert rows[0]["attend_ratio"] == rows[0]["begin_chunk_ratio"] == rows[0]["chunk_ratio"] == 2.0
    assert rows[0]["attend_ratio_rounds"] == [2.0, 2.0]
    broken = bench_host.summarise({"name": "REV", "commit": "REV", "import_error": "ImportError: no KVCache"}, {})
    failed = bench_host.compare(this, broken)
    assert "no KVCache" in failed[0]["error"]
    bench_host.print_comparison("REV", rows + failed)
    table = capsys.readouterr().out.splitlines()
    assert table[-2].split()[:4] == ["relax/window", "6", "3", "2.00"] and "failed" in table[-1]
