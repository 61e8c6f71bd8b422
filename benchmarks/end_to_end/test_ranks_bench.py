"""bench_ranks.py end to end at the tiny preset on 2 spawned gloo ranks (CPU time, not a GPU measurement):
what it writes, that the head-parallel flows match the single-process cache's (fp32, within the 1e-5 of
tests/generator/test_generator_distributed.py), and its CUDA-graph step's plumbing on a group of one (CPU: GraphForward
re-runs the pass at every "replay")."""
import json
import math
import statistics
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from benchmarks import common
from benchmarks.end_to_end import bench_ranks
from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import random_text

POLICIES = ["dense", "relax", "pack"]
WARMUP = {"dense": 6, "relax": 4, "pack": 67}  # common.steady_chunk at the tiny 4x4 grid
RANKS, ROUNDS, REPS = 2, 2, 1
ATOL = 1e-5  # fp32: the token-sharded matmuls' rounding, see tests/generator/test_generator_distributed.py


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks") / "ranks.json"
    data = bench_ranks.main(["--preset", "tiny", "--ranks", str(RANKS), "--backend", "reference", "--no-progress",
                             "--rounds", str(ROUNDS), "--reps", str(REPS), "--out", str(out)])
    return out, data


def test_json_csv_and_flags(run):
    out, data = run
    saved = json.loads(out.read_text())
    rows = saved.pop("rows")
    assert saved == data
    assert [r["policy"] for r in rows] == POLICIES
    cpu = not torch.cuda.is_available()
    env = data["env"]
    assert {"device", "torch", "triton", "commit", "date", "cpu_timing"} <= set(env)
    assert data["cpu_timing"] is cpu and env["cpu_timing"] is cpu and data["complete"]
    assert data["preset"] == "tiny" and data["batch"] == 1 and data["backend"] == "reference"
    assert data["ranks"] == RANKS and data["dist_backend"] == ("gloo" if cpu else "nccl")
    assert data["dtype"] == ("float32" if cpu else "bfloat16")
    if cpu:
        assert data["label"] == common.CPU_LABEL
    csv = out.with_suffix(".csv").read_text().splitlines()
    head = csv[0].split(",")
    assert len(csv) == 1 + len(POLICIES)
    assert {"policy", "ranks", "plain_ms", "parallel_ms", "ratio", "max_abs_diff", "graph", "cpu_timing"} <= set(head)


def test_policies_times_and_ratios(run):
    _, data = run
    assert list(data["policies"]) == POLICIES
    for name, pol in data["policies"].items():
        assert pol["ranks"] == RANKS and pol["chunk_frames"] == (4 if name == "pack" else 3)
        assert pol["passes_per_chunk"] == 5 and pol["warmup_chunks"] == WARMUP[name]
        assert pol["chunks"][0] >= WARMUP[name]  # steady chunks only
        # H / P heads of every pool; the few bytes of index tables are whole on every rank
        assert pol["kv_bytes_plain"] / RANKS <= pol["kv_bytes_parallel_rank"] < 1.01 * pol["kv_bytes_plain"] / RANKS
        for path in ("plain", "parallel"):
            rounds = pol[f"{path}_rounds_ms"]
            assert len(rounds) == ROUNDS and all(ms > 0 for ms in rounds)
            assert pol[f"{path}_ms"] == statistics.median(rounds) and pol[f"{path}_reps"] == ROUNDS * REPS
            assert "interleaved" in pol[f"{path}_method"]
            assert len(pol[f"{path}_ranks_ms"]) == RANKS and all(ms > 0 for ms in pol[f"{path}_ranks_ms"])
            assert pol[f"{path}_ranks_ms"][0] == pol[f"{path}_ms"]  # rank 0's
        assert math.isclose(pol["ratio"], pol["parallel_ms"] / pol["plain_ms"])
        assert len(pol["round_ratios"]) == ROUNDS
        if torch.cuda.is_available():
            assert pol["graph"] in ("cuda_graph", "failed")
        else:
            assert pol["graph"] == "not on CPU" and "graph_ms" not in pol


def test_flows_agree_in_steady_state(run):
    """The benchmark's own check: after the warm-up, one pass of one input through both paths on every rank."""
    _, data = run
    if data["dtype"] != "float32":
        pytest.skip(f"the tiny run is {data['dtype']} on this device: its flows differ by that dtype's rounding")
    worst = {name: (pol["max_abs_diff"], pol["max_abs_flow"]) for name, pol in data["policies"].items()}
    assert all(diff <= ATOL and flow > 0.1 for diff, flow in worst.values()), worst


def test_targets_and_table(run):
    _, data = run
    cpu = not torch.cuda.is_available()
    goals = data["targets"]
    assert [(g["policy"], g["ranks"], g["goal"]) for g in goals] == [(p, RANKS, 1.05) for p in POLICIES]
    for g in goals:
        assert g["value"] == data["policies"][g["policy"]]["ratio"]
        assert g["met"] is None if cpu else isinstance(g["met"], bool)
    table = bench_ranks.table(data)
    assert table.splitlines()[0].startswith(f"ranks tiny ({data['dtype']}, batch 1, backend reference")
    assert (common.CPU_LABEL in table) is cpu
    assert [line.split()[0] for line in table.splitlines()[2:5]] == POLICIES
    assert "target head-parallel / single-process cache <= 1.05" in table


@pytest.mark.parametrize("bad, error", [
    (["--ranks", "3"], "tiny's 2 heads are not divisible by the 3 ranks"),
    (["--ranks", "0"], None),
    (["--policies", "nope"], None),
], ids=["heads", "zero", "policy"])
def test_bad_arguments(bad, error, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_ranks.main(["--preset", "tiny", "--no-progress", "--out", str(tmp_path / "r.json"), *bad])
    if error:
        assert error in str(exc.value.code)
    else:
        assert exc.value.code == 2 and "error:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.fixture
def group_of_one(tmp_path):
    """This process as a gloo group of one (no spawn), on one thread (2 OpenMP threads beside gloo's on a busy
    2-core machine: ~10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1,
                            timeout=timedelta(seconds=30))
    try:
        yield bench_ranks.Ranks(0, 1, torch.device("cpu"))
    finally:
        dist.destroy_process_group()
        torch.set_num_threads(threads)


@torch.no_grad()
def test_graph_step_plumbing_on_a_cpu(group_of_one, monkeypatch):
    """capture_graph, which main runs on CUDA only: on a CPU GraphForward re-runs each pass, so the "replay" equals
    eager; a capture that raises is recorded, not raised."""
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    context = model.embed_text(random_text(cfg, 1, 0))
    plain, sharded, sharded_model = bench_ranks.make_runs("relax", model, context, group_of_one, "reference", 0)
    for path in (plain, sharded):  # to the steady plans, as main does: a capture fixes the shapes (KVCache.capture)
        path.warm_up(common.steady_chunk(path.cache.policy, cfg.grid_height, cfg.grid_width), "", False)
    graph, record = bench_ranks.capture_graph(sharded, sharded_model, context, group_of_one)
    assert graph is not None and record == {"graph": "cuda_graph", "graph_replay_equals_eager": True,
                                            "graph_max_abs_diff": 0.0}
    chunk = sharded.cache.chunk
    sharded.chunk(graph)
    assert sharded.cache.chunk == chunk + 1

    def broken(*args, **kwargs):
        raise RuntimeError("operation not permitted when stream is capturing\nmore")

    monkeypatch.setattr(bench_ranks, "GraphForward", broken)
    graph, record = bench_ranks.capture_graph(sharded, sharded_model, context, group_of_one)
    assert graph is None
    assert record == {"graph": "failed",
                      "graph_error": "rank 0: RuntimeError: operation not permitted when stream is capturing"}


def test_measure_ranks_counts_calls(group_of_one):
    calls = []
    t = bench_ranks.measure_ranks(lambda: calls.append(1), group_of_one, warmup=2, reps=3, budget_s=10.0)
    assert len(calls) == 1 + 1 + 3 and t.reps == 3 and t.ms >= 0 and t.cpu_timing
