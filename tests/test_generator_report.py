"""The rollout report's figures: they draw from a tiny CPU run, and the memory map says what each chunk attends to."""
import numpy as np
import pytest

from relaxkv_gen import build_model, get_preset, random_text, rollout
from relaxkv_gen.report import (ATTENDED, CHOSEN, CHOSEN_COMPRESSED, CURRENT, HELD, NOT_HELD, _same_as, build_report,
                                memory_map, plot_memory_map, plot_report)

CHUNKS = {"dense": 9, "sink": 9, "relax": 6, "pack": 7}  # past the full window, the Relax warm-up, Pack's first mid blocks
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report():
    cfg = get_preset("tiny")
    model = build_model(cfg, seed=0)
    text = random_text(cfg, 1, seed=0)
    results = [rollout(model, name, text, num_chunks=n, seed=1) for name, n in CHUNKS.items()]
    return build_report(results, {"preset": cfg.name, "model": cfg.to_dict(), "backend": "reference", "device": "cpu",
                                  "dtype": "float32", "timing": "CPU time (perf_counter)"})


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
