"""The rollout report's figures: they draw from a tiny CPU run, the memory map says what each chunk attends to,
and timing is a median and interquartile range over the steady chunks, plotted on a GPU only."""
import copy

import numpy as np
import pytest

from relaxkv_gen import build_model
from relaxkv_gen import get_preset
from relaxkv_gen import random_text
from relaxkv_gen import rollout
from relaxkv_gen.report import ATTENDED
from relaxkv_gen.report import CHOSEN
from relaxkv_gen.report import CHOSEN_COMPRESSED
from relaxkv_gen.report import CURRENT
from relaxkv_gen.report import HELD
from relaxkv_gen.report import NOT_HELD
from relaxkv_gen.report import STEADY_MIN
from relaxkv_gen.report import _same_as
from relaxkv_gen.report import build_report
from relaxkv_gen.report import format_timing_table
from relaxkv_gen.report import memory_map
from relaxkv_gen.report import plot_memory_map
from relaxkv_gen.report import plot_report
from relaxkv_gen.report import steady_chunks
from relaxkv_gen.report import time_panel_left_out
from relaxkv_gen.report import timing_summary
from relaxkv_gen.rollout import SectionTimer
from relaxkv_gen.rollout import clock_label

# past the full window, the Relax warm-up, Pack's first mid blocks
CHUNKS = {"dense": 9, "sink": 9, "relax": 6, "pack": 7}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    text = random_text(cfg, 1, seed=0)
    results = [rollout(model, name, text, num_chunks=n, seed=1) for name, n in CHUNKS.items()]
    return build_report(results, {"preset": cfg.name, "model": cfg.to_dict(), "backend": "reference", "device": "cpu",
                                  "dtype": "float32", "timing": clock_label("cpu")})


def test_plots_write_both_figures(tmp_path, report):
    plot_report(report, tmp_path / "report.png")
    plot_memory_map(report, tmp_path / "report_memory_map.png")
    for name in ("report.png", "report_memory_map.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 20_000, name


def _frames(row, category):
    return [int(f) for f in np.flatnonzero(row == category)]


def test_memory_map_dense_and_sink(report):
    dense, _ = memory_map(report, "dense")
    assert dense.shape == (9, 27)
    assert _frames(dense[8], CURRENT) == [24, 25, 26]
    assert _frames(dense[8], ATTENDED) == list(range(6, 24))  # 21-frame window: 18 previous frames
    assert _frames(dense[8], NOT_HELD) == list(range(6))
    sink, _ = memory_map(report, "sink")
    assert _frames(sink[8], ATTENDED) == [0, 1, 2, *range(9, 24)]  # 3 sink frames + 15 previous
    assert _frames(sink[0], CURRENT) == [0, 1, 2] and _frames(sink[0], ATTENDED) == []


def test_memory_map_relax(report):
    grid, candidates = memory_map(report, "relax")
    row = grid[5]  # frames 15..17; 15 cached frames: sink 0-1, tail 14, one history frame of 4 candidates
    assert _frames(row, CURRENT) == [15, 16, 17]
    assert _frames(row, ATTENDED) == [0, 1, 14]
    chosen = _frames(row, CHOSEN)
    scored = [f for r, f in candidates if r == 5]
    assert len(chosen) == 1 and chosen[0] in scored and len(scored) == 4
    held = _frames(row, HELD)  # the cache keeps only frames a later chunk can still read
    assert set(scored) - set(chosen) <= set(held) and max(held) == 13 and min(held) > 2
    assert _frames(grid[1], ATTENDED) == [0, 1, 2] and not _frames(grid[1], CHOSEN)  # warm-up: every frame


def test_memory_map_pack(report):
    grid, candidates = memory_map(report, "pack")
    row = grid[6]  # frames 24..27: sink blocks 0-1, mid blocks 2-4 (all selected, compressed), recent block 5
    assert _frames(row, CURRENT) == [24, 25, 26, 27]
    assert _frames(row, ATTENDED) == [*range(8), *range(20, 24)]
    assert _frames(row, CHOSEN_COMPRESSED) == list(range(8, 20))
    assert not candidates


def test_coinciding_series_are_named():
    assert _same_as({"dense": [(1, 5)], "sink": [(1, 5)], "relax": [(1, 6)]}) == {"sink": "dense"}


def _timed_chunks(keys: list[int], chunk_ms: list[float]) -> list[dict]:
    return [{"chunk": i, "keys_attended": k, "selects": False, "timing_ms": {"qkv": ms / 2, "chunk": ms}}
            for i, (k, ms) in enumerate(zip(keys, chunk_ms))]


def test_timing_summary_is_median_and_iqr_over_the_steady_chunks():
    # chunk 0 does the steady work too but is never counted (one-time costs); 1-2 are warm-up (fewer keys)
    ms = [900.0, 5.0, 6.0, 10.0, 40.0, 11.0, 12.0, 13.0]
    chunks = _timed_chunks([30, 10, 20, 30, 30, 30, 30, 30], ms)
    assert steady_chunks(chunks) == [3, 4, 5, 6, 7]
    t = timing_summary(chunks, chunk_frames=3)
    q1, median, q3 = np.percentile(ms[3:], [25, 50, 75])
    assert t["steady_chunks"] == [3, 4, 5, 6, 7]
    assert t["ms"]["chunk"] == {"median": median, "q1": q1, "q3": q3} and median == 12.0  # the outlier 40 is in q3
    assert t["ms"]["qkv"]["median"] == median / 2
    assert t["ms_per_video_frame"]["median"] == pytest.approx(median / 12)  # 3 latent frames = 12 video frames


def test_timing_summary_needs_enough_steady_chunks():
    t = timing_summary(_timed_chunks([10, 20, 30, 30], [1.0, 2.0, 3.0, 4.0]), chunk_frames=3)
    assert t["steady_chunks"] == [2, 3] and len(t["steady_chunks"]) < STEADY_MIN
    assert t["ms"] is None and t["ms_per_video_frame"] is None
    short = {"meta": {"device": "cuda:0", "timing": "CUDA events"}, "policies": {"relax": {"timing": t}}}
    assert format_timing_table(short) == ("timing: CUDA events: no policy has 3 steady chunks (after the first, doing "
                                          "the last chunk's work) to summarise; generate more chunks\n")
    untimed = [{k: v for k, v in c.items() if k != "timing_ms"} for c in _timed_chunks([1] * 5, [1.0] * 5)]
    assert timing_summary(untimed, chunk_frames=3) is None


def test_report_steady_chunks_follow_the_plans(report):
    """From the tiny run's plans: the 21-frame dense window is full from chunk 6 (18 earlier frames + 3), Relax
    selects from chunk 2, Pack's mid archive still grows at its last chunk."""
    timing = {name: pol["timing"] for name, pol in report["policies"].items()}
    assert timing["dense"]["steady_chunks"] == timing["sink"]["steady_chunks"] == [6, 7, 8]
    assert timing["relax"]["steady_chunks"] == [2, 3, 4, 5] and timing["relax"]["ms"]["chunk"]["median"] > 0
    assert timing["pack"]["steady_chunks"] == [6] and timing["pack"]["ms"] is None
    for pol in report["policies"].values():
        for c in pol["chunks"]:
            t = c["timing_ms"]
            assert t["chunk"] >= t["self_attn"] + t["cross_attn"] + t["ffn"]


def test_cpu_report_has_no_time_panel_and_says_why(tmp_path, report):
    reason = time_panel_left_out(report)
    assert reason.startswith("no time panel on a CPU: wall time")
    assert plot_report(report, tmp_path / "report.png") == ["KV memory: in use (solid) and allocated cap (dashed)"]
    table = format_timing_table(report)
    assert table.startswith("timing: wall time on the CPU (time.perf_counter); median [q1, q3] over the steady chunks")
    assert "note: host wall time" in table and "CPU time" not in table
    rows = {line.split("  ")[0].strip(): line for line in table.splitlines()}
    assert "n/a" in rows["chunk total"] and "[" in rows["chunk total"]  # pack: n/a; the others: median [q1, q3]
    assert SectionTimer("cpu").label == clock_label("cpu") == "wall time on the CPU (time.perf_counter)"


def test_gpu_report_plots_median_and_iqr(tmp_path, report):
    gpu = copy.deepcopy(report)
    gpu["meta"].update(device="cuda:0", timing="CUDA events")
    assert time_panel_left_out(gpu) is None
    titles = plot_report(gpu, tmp_path / "report.png")
    assert titles[0].startswith("Time per video frame: median and IQR over the steady chunks\n(CUDA events;")
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG_MAGIC
    assert "note:" not in format_timing_table(gpu) and "timing: CUDA events;" in format_timing_table(gpu)
    for pol in gpu["policies"].values():
        pol["timing"] = None  # --no-timing
    assert time_panel_left_out(gpu) == "timing off (--no-timing)" and format_timing_table(gpu) == ""
    assert len(plot_report(gpu, tmp_path / "untimed.png")) == 1
