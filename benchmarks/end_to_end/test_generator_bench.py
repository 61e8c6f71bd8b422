"""bench_generator.py end to end at the tiny preset (CPU in CI: CPU time, graphs emulated; on a GPU the
same run captures real CUDA graphs), and its steady-state search at Wan2.1 shapes."""
import json
import math

import pytest
import torch

from benchmarks import common
from benchmarks.end_to_end import bench_generator
from benchmarks.plots import plot_generator
from relaxkv_gen.rollout import make_policy

WARMUP = {"dense": 6, "sink": 6, "relax": 4, "pack": 67}  # window full; Relax past warm-up; Pack's archive (64) full


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen") / "generator.json"
    data = bench_generator.main(["--preset", "tiny", "--no-progress", "--out", str(out)])
    return out, data


@pytest.mark.parametrize("name", list(WARMUP))
def test_steady_state_at_wan_shapes(name):
    assert common.steady_chunk(make_policy(name), 30, 52) == WARMUP[name]


def test_json_csv_png_and_flags(run, capsys):
    out, data = run
    saved = json.loads(out.read_text())
    rows = saved.pop("rows")
    assert saved == json.loads(json.dumps(data, default=str))
    assert [(r["policy"], r["mode"]) for r in rows] == [(p, m) for p in WARMUP for m in ("eager", "graph")]
    cpu = not torch.cuda.is_available()
    env = data["env"]
    assert {"device", "torch", "triton", "commit", "date", "cpu_timing"} <= set(env)
    assert data["cpu_timing"] is cpu and env["cpu_timing"] is cpu and data["complete"]
    assert data["preset"] == "tiny" and data["passes_per_chunk"] == 5
    if cpu:
        assert data["label"] == common.CPU_LABEL
    csv = out.with_suffix(".csv").read_text().splitlines()
    assert len(csv) == 1 + 2 * len(WARMUP) and "cpu_timing" in csv[0] and "attention_ms" in csv[0]
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    table = out.with_name("GENERATOR.md")
    assert [p.name for p in plot_generator.main([str(out), "--table", str(table)])] == [out.with_suffix(".png").name]
    md = table.read_text()
    assert md.startswith(f"### Generator end to end: tiny DiT per chunk ({env['device']}")
    assert (common.CPU_LABEL in md) is cpu
    # the rows whose latent frames / chunk (2nd column of the first table) is 3: a timing cell of the other rows or
    # of the breakdown table can print as "3" too (e.g. ms / video frame 2.998), so read that column alone
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| policy | latent frames / chunk |")) + 2
    rows = [line.split(" | ") for line in lines[start:lines.index("", start)]]
    assert [cells[0] for cells in rows if cells[1] == "3"] == ["| dense", "| sink", "| relax"]


def test_policies_modes_and_breakdown_sums(run):
    _, data = run
    cpu = not torch.cuda.is_available()
    assert list(data["policies"]) == list(WARMUP)
    for name, pol in data["policies"].items():
        u = 4 if name == "pack" else 3
        assert pol["chunk_frames"] == u and pol["warmup_chunks"] == WARMUP[name] and pol["kv_bytes"] > 0
        assert list(pol["modes"]) == ["eager", "graph"]
        assert pol["modes"]["graph"]["kind"] == ("emulated (CPU)" if cpu else "cuda_graph")
        assert pol["modes"]["graph"]["replay_equals_eager"] is True and pol["modes"]["graph"]["max_abs_diff"] == 0
        for mode, res in pol["modes"].items():
            assert res["chunks"][0] >= WARMUP[name]  # only steady-state chunks are timed
            assert res["ms_per_chunk"] > 0 and res["reps"] >= 1
            assert math.isclose(res["video_fps"], 4 * u * 1e3 / res["ms_per_chunk"])
            parts = res["breakdown_ms"]
            assert list(parts) == list(plot_generator.BREAKDOWN)
            assert math.isclose(sum(parts.values()), res["profiled_ms_per_chunk"], rel_tol=1e-9)
            assert all(v >= 0 for k, v in parts.items() if k != "rest"), (name, mode, parts)
            assert parts["qkv"] > 0 and parts["attention"] > 0 and parts["cross_attn"] > 0 and parts["ffn"] > 0
            assert (parts["select"] > 0) == (name in ("relax", "pack")), (name, mode, parts)
            assert res["stage_ms"] <= parts["attention"]


def test_targets_and_table(run, capsys):
    _, data = run
    cpu = not torch.cuda.is_available()
    goals = data["targets"]
    assert [(g["mode"], g["goal"]) for g in goals] == [("eager", 250.0), ("eager", 1.6),
                                                        ("graph", 250.0), ("graph", 1.6)]
    for g in goals:
        assert g["met"] is None if cpu else isinstance(g["met"], bool)
    ratio = goals[1]["value"]
    dense, relax = data["policies"]["dense"]["modes"]["eager"], data["policies"]["relax"]["modes"]["eager"]
    assert math.isclose(ratio, dense["ms_per_chunk"] / relax["ms_per_chunk"])
    table = bench_generator.table(data)
    assert table.splitlines()[0].startswith("generator tiny")
    assert (common.CPU_LABEL in table) is cpu
    assert "relax   graph" in table and "target dense/relax speed ratio >= 1.6" in table
