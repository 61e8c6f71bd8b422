"""bench_diffusers.py end to end at the tiny preset (CPU in CI: CPU time, not a GPU measurement), what it
writes, its skip without diffusers, and that the two models it compares compute the same flows (fp32, within the
2e-5 of tests/integrations/test_diffusers_adapter.py, whose docstring says where the rounding differences come from)."""
import json
import math
import statistics

import pytest
import torch

from benchmarks import common
from benchmarks.end_to_end import bench_diffusers
from relaxkv_gen import get_preset
from relaxkv_gen import random_text
from relaxkv_kernels.integrations.diffusers import detach

POLICIES = ["dense", "relax", "pack"]
WARMUP = {"dense": 6, "relax": 4, "pack": 67}  # common.steady_chunk at the tiny 4x4 grid
ATOL = 2e-5  # fp32, see tests/integrations/test_diffusers_adapter.py
ROUNDS, REPS = 2, 2


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    pytest.importorskip("diffusers")
    out = tmp_path_factory.mktemp("diffusers") / "diffusers.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny pass: ~5 ms on one thread; 2 OpenMP threads on a busy 2-core machine: ~400 ms
    try:
        data = bench_diffusers.main(["--preset", "tiny", "--no-progress", "--rounds", str(ROUNDS), "--reps", str(REPS),
                                     "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return out, data


def test_json_csv_and_flags(run):
    out, data = run
    saved = json.loads(out.read_text())
    rows = saved.pop("rows")
    assert saved == json.loads(json.dumps(data, default=str))
    assert [r["policy"] for r in rows] == POLICIES
    cpu = not torch.cuda.is_available()
    env = data["env"]
    assert {"device", "torch", "triton", "commit", "date", "cpu_timing"} <= set(env)
    assert data["cpu_timing"] is cpu and env["cpu_timing"] is cpu and data["complete"] and "skipped" not in data
    assert data["preset"] == "tiny" and data["batch"] == 1 and data["diffusers"]
    assert data["dtype"] == ("float32" if cpu else "bfloat16")
    if cpu:
        assert data["label"] == common.CPU_LABEL and data["backend"] == "reference"
    csv = out.with_suffix(".csv").read_text().splitlines()
    head = csv[0].split(",")
    assert len(csv) == 1 + len(POLICIES)
    assert {"policy", "ours_ms", "diffusers_ms", "ratio", "extra_text_embedder_ms", "cpu_timing"} <= set(head)


def test_policies_times_and_ratios(run):
    _, data = run
    assert list(data["policies"]) == POLICIES
    for name, pol in data["policies"].items():
        assert pol["chunk_frames"] == (4 if name == "pack" else 3) and pol["passes_per_chunk"] == 5
        assert pol["warmup_chunks"] == WARMUP[name] and pol["chunks"][0] >= WARMUP[name]  # steady chunks only
        assert pol["kv_bytes"] > 0
        for side in ("ours", "diffusers"):
            rounds = pol[f"{side}_rounds_ms"]
            assert len(rounds) == ROUNDS and all(ms > 0 for ms in rounds)
            assert pol[f"{side}_ms"] == statistics.median(rounds) and pol[f"{side}_reps"] >= ROUNDS
            assert "interleaved" in pol[f"{side}_method"]
        assert math.isclose(pol["ratio"], pol["diffusers_ms"] / pol["ours_ms"])
        assert [math.isclose(r, d / o) for r, o, d in zip(pol["round_ratios"], pol["ours_rounds_ms"],
                                                            pol["diffusers_rounds_ms"])] == [True] * ROUNDS
        extra = pol["extra_ms_per_chunk"]
        assert list(extra) == ["text_embedder", "rope_table"] and all(ms > 0 for ms in extra.values())
        assert math.isclose(pol["ratio_less_extra"], (pol["diffusers_ms"] - sum(extra.values())) / pol["ours_ms"])


def test_flows_agree_in_steady_state(run):
    """The benchmark's own check: after the warm-up, one pass of one input through both models (fp32 on a CPU)."""
    _, data = run
    if data["dtype"] != "float32":
        pytest.skip(f"the tiny run is {data['dtype']} on this device: its flows differ by that dtype's rounding")
    for name, pol in data["policies"].items():
        assert pol["max_abs_flow"] > 0.1 and pol["max_abs_diff"] <= ATOL, (name, pol["max_abs_diff"])


def test_build_models_same_weights_same_flow():
    """build_models: the transformer holds the model's weights bitwise; from fresh caches after two chunks, the
    flows of one input agree within ATOL (fp32, on the CPU whatever the machine)."""
    pytest.importorskip("diffusers")
    from relaxkv_gen.diffusers import wan_to_diffusers

    cfg = get_preset("tiny")
    model, transformer = bench_diffusers.build_models(cfg, torch.device("cpu"), torch.float32, seed=3)
    want = wan_to_diffusers(model.state_dict())
    got = transformer.state_dict()
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        sides = bench_diffusers.make_sides("relax", model, transformer, random_text(cfg, 1, 4), "reference", seed=5)
        try:
            for side in sides.values():
                side.warm_up(2, "", False)
            check = bench_diffusers.flow_diff(sides, seed=6)
        finally:
            detach(transformer)
    assert check["max_abs_flow"] > 0.1 and check["max_abs_diff"] <= ATOL, check


def test_targets_and_table(run):
    _, data = run
    cpu = not torch.cuda.is_available()
    goals = data["targets"]
    assert [(g["policy"], g["goal"], g["mode"]) for g in goals] == [(p, 1.03, "eager") for p in POLICIES]
    for g in goals:
        assert g["value"] == data["policies"][g["policy"]]["ratio"]
        assert g["met"] is None if cpu else isinstance(g["met"], bool)
    table = bench_diffusers.table(data)
    assert table.splitlines()[0].startswith("diffusers adapter tiny")
    assert (common.CPU_LABEL in table) is cpu
    assert [line.split()[0] for line in table.splitlines()[2:5]] == POLICIES
    assert "target diffusers adapter / relaxkv_gen <= 1.03" in table


def test_skipped_without_diffusers(tmp_path, monkeypatch, capsys):
    """Where diffusers cannot be imported (a GPU machine without it), nothing is measured: the JSON says why."""
    def missing(*args, **kwargs):
        raise ImportError("relaxkv_kernels.integrations.diffusers needs diffusers: pip install "
                          '"relaxkv-kernels[diffusers]"')

    monkeypatch.setattr(bench_diffusers, "build_models", missing)
    out = tmp_path / "skipped.json"
    data = bench_diffusers.main(["--preset", "tiny", "--no-progress", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert "needs diffusers" in data["skipped"] and saved["skipped"] == data["skipped"]
    assert saved["policies"] == {} and saved["targets"] == [] and saved["rows"] == [] and not saved["complete"]
    assert "SKIPPED" in capsys.readouterr().err
    assert "skipped: relaxkv_kernels.integrations.diffusers needs diffusers" in bench_diffusers.table(data)
