"""Rollout report: JSON (data), two PNGs and a printed timing table.

``report.png``: KV memory against the video frame each chunk ends at (chunks are 3 latent frames for
dense / sink / relax and 4 for pack, so per-chunk figures are not comparable; one latent frame = 4 video
frames) and, on a GPU, the time per video frame of each policy. ``report_memory_map.png``: for every chunk
and policy, which earlier frames (and Pack compressed blocks) the chunk attends to, and what the cache
still holds.

Timing is summarised, never shown chunk by chunk: the median and interquartile range over a policy's
steady chunks (:func:`steady_chunks`: those doing the same work as its last chunk). One sample per chunk
on a busy machine is mostly noise: a shared 2-core CPU timed the same qkv section of identical chunks at
2.4 to 202 ms and showed the sink policy 4x faster than dense, which does the same work. On a CPU the
figure leaves the time panel out: wall time there measures the machine's load as much as the work, and
the policies run one after another under whatever load each met, which no spread within one policy can
reveal. The printed table still gives the CPU's median [q1, q3], labelled as wall time, for comparing
sections within a policy. On a GPU the clock is CUDA events, which time the device's work alone.
"""
from __future__ import annotations

import json
import platform
import textwrap
from pathlib import Path

import numpy as np
import torch

from .config import VIDEO_FRAMES_PER_LATENT
from .rollout import BLOCK_SECTIONS
from .rollout import CHUNK_SECTION
from .rollout import SELF_ATTN_SECTIONS
from .rollout import RolloutResult

SECTION_TITLES = {"qkv": "qkv+norm", "rope_append": "rope+write", "select": "scoring", "compress": "compress",
                  "attention": "attention", "o_proj": "o-proj", "self_attn": "self-attn", "cross_attn": "cross-attn",
                  "ffn": "ffn", "chunk": "chunk total"}
MIB = 2**20
STEADY_MIN = 3  # steady chunks needed for a median and an interquartile range
TABLE_ROWS = (*SELF_ATTN_SECTIONS, "self_attn", *BLOCK_SECTIONS, CHUNK_SECTION)
CPU_CAVEAT = ("host wall time: it counts waits for cores busy with other processes, and the policies ran one "
              "after another under whatever load each met; compare sections within a policy, not policies")
# one look per policy: dense and sink share a window and draw on top of each other, so sink gets hollow
# markers and a dashed line that let dense show through
STYLES = {
    "dense": dict(color="C0", marker="o", linestyle="-", markersize=6),
    "sink": dict(color="C1", marker="o", linestyle="--", markersize=9, markerfacecolor="none", markeredgewidth=1.5),
    "relax": dict(color="C2", marker="^", linestyle="-", markersize=5),
    "pack": dict(color="C3", marker="s", linestyle="-.", markersize=5),
}
# memory map categories: (label, colour), drawn in this order of precedence (later wins)
MAP_CATEGORIES = (
    ("not in the cache", "#ffffff"),
    ("held, not attended", "#d9d9d9"),
    ("held compressed only (Pack archive), not attended", "#c7e9c0"),
    ("attended at full resolution (fixed by the plan)", "#4c78a8"),
    ("attended, chosen on the device (Relax history)", "#f58518"),
    ("attended compressed, chosen on the device (Pack mid block)", "#31a354"),
    ("current chunk", "#222222"),
)
NOT_HELD, HELD, HELD_COMPRESSED, ATTENDED, CHOSEN, CHOSEN_COMPRESSED, CURRENT = range(len(MAP_CATEGORIES))
MAP_MAX_CHUNKS = 48  # rows per policy in the memory map: past the warm-ups, Pack choosing 16 of 40+ blocks; legible


def _quartiles(values: list[float]) -> dict[str, float]:
    q1, median, q3 = np.percentile(np.asarray(values, dtype=np.float64), [25, 50, 75])
    return {"median": float(median), "q1": float(q1), "q3": float(q3)}


def steady_chunks(chunks: list[dict]) -> list[int]:
    """Positions in ``chunks`` of the steady ones: after the first chunk (one-time costs: allocations, lazy
    initialisation), attending to as many keys as the last chunk, with the same selection step.

    Warm-up chunks do less work (the dense window is filling, Pack's mid archive growing, Relax not yet
    selecting), so their times are not samples of the same quantity.
    """
    def work(c):
        return c.get("keys_attended"), c.get("selects")

    return [i for i in range(1, len(chunks)) if work(chunks[i]) == work(chunks[-1])]


def timing_summary(chunks: list[dict], chunk_frames: int) -> dict | None:
    """Median and interquartile range of each timed section over the steady chunks (:func:`steady_chunks`).

    Returns None when the chunks were not timed, else ``{"steady_chunks": [chunk numbers], "ms": {section:
    {"median", "q1", "q3"}} | None, "ms_per_video_frame": {...} | None}``: ``ms`` is None with fewer than
    :data:`STEADY_MIN` steady chunks. Sections are summed over layers and passes, ``"chunk"`` is the whole chunk.
    """
    if not chunks or any("timing_ms" not in c for c in chunks):
        return None
    steady = [chunks[i] for i in steady_chunks(chunks)]
    summary = {"steady_chunks": [c["chunk"] for c in steady], "ms": None, "ms_per_video_frame": None}
    if len(steady) >= STEADY_MIN:
        summary["ms"] = {name: _quartiles([c["timing_ms"].get(name, 0.0) for c in steady])
                         for name in steady[0]["timing_ms"]}
        per_frame = chunk_frames * VIDEO_FRAMES_PER_LATENT
        summary["ms_per_video_frame"] = {k: v / per_frame for k, v in summary["ms"][CHUNK_SECTION].items()}
    return summary


def build_report(results: list[RolloutResult], meta: dict) -> dict:
    """JSON-ready report: ``{"meta": {...}, "policies": {name: {"chunk_frames", "chunks": [...], "timing"}}}``
    (``timing``: :func:`timing_summary`; ``meta["timing"]`` names the clock)."""
    meta = dict(meta)
    meta.setdefault("torch", torch.__version__)
    meta.setdefault("python", platform.python_version())
    if torch.cuda.is_available() and str(meta.get("device", "")).startswith("cuda"):
        meta.setdefault("device_name", torch.cuda.get_device_name(torch.device(meta["device"])))
    else:
        meta.setdefault("device_name", platform.processor() or platform.machine())
    return {
        "meta": meta,
        "policies": {
            r.policy: {
                "chunk_frames": r.chunk_frames,
                "latent_shape": list(r.latents.shape),
                "chunks": r.chunks,
                "timing": timing_summary(r.chunks, r.chunk_frames),
                "memory": r.memory,
            }
            for r in results
        },
    }


def write_json(report: dict, path) -> None:
    Path(path).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _style(name: str, i: int) -> dict:
    return STYLES.get(name, dict(color=f"C{4 + i}", marker="v", linestyle=":", markersize=5))


def _end_video_frame(chunk: dict) -> int:
    """Video frame at which a chunk ends: (start_frame + frames) latent frames x 4."""
    return (chunk["start_frame"] + chunk["frames"]) * VIDEO_FRAMES_PER_LATENT


def _same_as(series: dict[str, list]) -> dict[str, str]:
    """policy -> the earlier policy whose series is identical (lines drawn on top of each other)."""
    out, names = {}, list(series)
    for i, name in enumerate(names):
        twin = next((other for other in names[:i] if series[other] == series[name]), None)
        if twin is not None:
            out[name] = twin
    return out


def _title(report: dict) -> str:
    meta = report["meta"]
    return (f"{meta.get('preset')} | backend {meta.get('backend')} | {meta.get('device')} ({meta.get('device_name')}) "
            f"| {meta.get('dtype')} | timing: {meta.get('timing', 'off')}")


def _on_cpu(report: dict) -> bool:
    return not str(report["meta"].get("device", "")).startswith("cuda")


def time_panel_left_out(report: dict) -> str | None:
    """Why ``report.png`` has no time panel (None: it has one)."""
    if any(p.get("timing") is None for p in report["policies"].values()):
        return "timing off (--no-timing)"
    if _on_cpu(report):
        return ("no time panel on a CPU: wall time there measures the machine's load as much as the work, and the "
                "policies ran one after another (the printed table has medians and spreads)")
    return None


def _plot_time(ax, report: dict) -> None:
    """Bars: median ms per video frame over each policy's steady chunks, whiskers: the interquartile range."""
    for i, (name, pol) in enumerate(report["policies"].items()):
        t, colour = pol["timing"], _style(name, i)["color"]
        n = len(t["steady_chunks"])
        if t["ms_per_video_frame"] is None:
            ax.annotate(f"n/a: {n} steady\nchunk(s)", (i, 0), textcoords="offset points", xytext=(0, 4),
                        ha="center", fontsize=8)
            continue
        q = t["ms_per_video_frame"]
        ax.bar(i, q["median"], color=colour, alpha=0.8)
        ax.errorbar(i, q["median"], yerr=[[q["median"] - q["q1"]], [q["q3"] - q["median"]]], color="black",
                    capsize=6)
        ax.annotate(f"{q['median']:.3g}\nn={n}", (i, q["q3"]), textcoords="offset points", xytext=(0, 4),
                    ha="center", fontsize=8)
    names = list(report["policies"])
    ax.set_xticks(range(len(names)), [f"{n}\n({report['policies'][n]['chunk_frames']} fr./chunk)" for n in names])
    ax.set(ylabel="ms per video frame (chunk time / video frames)",
           title=f"Time per video frame: median and IQR over the steady chunks\n({report['meta'].get('timing')}; "
                 "4 denoising + 1 refresh pass per chunk)")
    top = max((p["timing"]["ms_per_video_frame"]["q3"] for p in report["policies"].values()
               if p["timing"]["ms_per_video_frame"] is not None), default=1.0)
    ax.set_ylim(0, 1.25 * top)  # room for the labels above the whiskers
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.grid(alpha=0.3, axis="y")


def plot_report(report: dict, path) -> list[str]:
    """KV memory (in use, and the allocated cap) against the video frame and, when timed on a GPU, the time per
    video frame of each policy (:func:`time_panel_left_out` says why not otherwise). Returns the panels' titles."""
    plt = _pyplot()
    left_out = time_panel_left_out(report)
    if left_out is None:
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True,
                                         gridspec_kw={"width_ratios": [2, 3]})
        _plot_time(ax_t, report)
    else:
        fig, ax_m = plt.subplots(1, 1, figsize=(13, 4.8), constrained_layout=True)
    pols = report["policies"]
    xs = {n: [_end_video_frame(c) for c in p["chunks"]] for n, p in pols.items()}
    live = {n: list(zip(xs[n], [c["kv_live_bytes"] for c in p["chunks"]])) for n, p in pols.items()}
    caps = {n: list(zip(xs[n], [c["kv_bytes"] for c in p["chunks"]])) for n, p in pols.items()}
    live_twin, cap_twin = _same_as(live), _same_as(caps)
    for i, (name, pol) in enumerate(pols.items()):
        style = dict(_style(name, i), markevery=max(1, len(pol["chunks"]) // 40))  # ~40 markers a line
        same = f" (same as {live_twin[name]})" if name in live_twin else ""
        ax_m.plot(xs[name], [b / MIB for _, b in live[name]], label=f"{name}: in use{same}", **style)
        same = f" (same as {cap_twin[name]})" if name in cap_twin else ""
        dashes = (6, 3) if name not in cap_twin else (2, 4)  # a coinciding cap: shorter dashes in the gaps
        ax_m.plot(xs[name], [b / MIB for _, b in caps[name]], color=style["color"], linestyle=(0, dashes),
                  linewidth=1.2, label=f"{name}: allocated = cap{same}")
    ax_m.set(xlabel="video frame (end of chunk; 4 video frames per latent frame)", ylabel="KV memory (MiB)",
             title="KV memory: in use (solid) and allocated cap (dashed)")
    ax_m.set_ylim(bottom=0)
    ax_m.grid(alpha=0.3)
    ax_m.set_xlim(left=0)
    ax_m.legend(fontsize=7, ncol=2)
    fig.suptitle(_title(report) + ("" if left_out is None else "\n" + textwrap.fill(left_out, 150)), fontsize=9)
    titles = [ax.get_title() for ax in fig.axes]
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return titles


def frame_tokens(report: dict) -> int:
    """F, tokens per latent frame, from the report's model config."""
    m = report["meta"]["model"]
    return (m["latent_height"] // m["patch_size"][1]) * (m["latent_width"] // m["patch_size"][2])


def memory_map(report: dict, name: str, max_chunks: int = MAP_MAX_CHUNKS) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Category (``MAP_CATEGORIES`` index) of every (chunk, latent frame) of policy ``name``, batch element 0,
    for its first ``max_chunks`` chunks: int8 [chunks, frames], and the (chunk, frame) cells of the candidates
    a chunk scored (Relax).

    Attended frames come from the device segment table (``selected_frames``); device-chosen segments
    shorter than a frame (``plan.selected_keys`` spread over them) are compressed blocks covering a chunk's
    frames. Held frames are the plan's ``slot_pos``, held compressed blocks Pack's ``index.block_pos``.
    """
    pol = report["policies"][name]
    chunks, f_tokens, u = pol["chunks"][:max_chunks], frame_tokens(report), pol["chunk_frames"]
    n_frames = max(c["start_frame"] + c["frames"] for c in chunks)
    grid = np.full((len(chunks), n_frames), NOT_HELD, dtype=np.int8)
    candidates = []
    for row, c in enumerate(chunks):
        plan = c["plan"]
        index = plan.get("index") or {}
        cells = grid[row]

        def mark(frames, category):
            for fr in frames:
                if 0 <= fr < n_frames:
                    cells[fr] = max(cells[fr], category)

        mark((f for f in plan["slot_pos"] if f >= 0), HELD)
        mark((b + i for b in index.get("block_pos", []) if b >= 0 for i in range(u)), HELD_COMPRESSED)
        planned = plan["frames_attended"]
        shown = c.get("selected_frames", [planned])[0]
        n_chosen = planned.count(-1)
        compressed = n_chosen and plan["selected_keys"] / n_chosen < f_tokens
        for plan_frame, frame in zip(planned, shown):
            if plan_frame == -2 or frame < 0:
                continue
            if plan_frame != -1:
                mark([frame], ATTENDED)
            elif compressed:
                mark(range(frame, frame + u), CHOSEN_COMPRESSED)
            else:
                mark([frame], CHOSEN)
        mark(range(c["start_frame"], c["start_frame"] + c["frames"]), CURRENT)
        candidates += [(row, fr) for fr in index.get("candidates", [])]
    return grid, candidates


def plot_memory_map(report: dict, path) -> None:
    """One panel per policy: rows are chunks, columns video frames, colours what each chunk attends to."""
    from matplotlib.colors import ListedColormap
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    plt = _pyplot()
    pols = report["policies"]
    rows = [min(len(p["chunks"]), MAP_MAX_CHUNKS) for p in pols.values()]
    heights = [min(0.5 + 0.13 * r, 5.0) for r in rows]  # inches per panel
    fig, axes = plt.subplots(len(pols), 1, figsize=(13, 1.6 + sum(heights)), sharex=True, squeeze=False,
                             gridspec_kw={"height_ratios": heights}, constrained_layout=True)
    cmap = ListedColormap([colour for _, colour in MAP_CATEGORIES])
    v = VIDEO_FRAMES_PER_LATENT
    for ax, (name, pol) in zip(axes[:, 0], pols.items()):
        grid, candidates = memory_map(report, name)
        n_chunks, n_frames = grid.shape
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(MAP_CATEGORIES) - 0.5, aspect="auto", interpolation="nearest",
                  extent=(0, n_frames * v, n_chunks - 0.5, -0.5))
        if candidates:
            cy, cx = zip(*candidates)
            ax.plot([(x + 0.5) * v for x in cx], cy, linestyle="none", marker="x", color="black", markersize=4)
        shown = "" if n_chunks == len(pol["chunks"]) else f", first {n_chunks} of {len(pol['chunks'])}"
        ax.set_ylabel(f"{name}\nchunk ({pol['chunk_frames']} fr.{shown})")
        ax.set_yticks(range(0, n_chunks, max(1, n_chunks // 5)))
        if n_frames <= 100:  # a thin line between latent frames while cells are wide enough to see it
            ax.set_xticks(np.arange(0, n_frames * v + 1, v), minor=True)
            ax.grid(which="minor", axis="x", color="white", linewidth=0.3)
    axes[-1, 0].set_xlabel("video frame (each cell is one latent frame = 4 video frames)")
    handles = [Patch(facecolor=colour, edgecolor="#888888", label=label) for label, colour in MAP_CATEGORIES]
    handles.append(Line2D([], [], linestyle="none", marker="x", color="black", label="candidate scored (Relax)"))
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle("What each chunk attends to (batch element 0); " + _title(report).split(" | timing")[0], fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _chunk_ranges(chunks: list[int]) -> str:
    """[7, 8, 9, 12] -> "7-9,12"."""
    runs: list[list[int]] = []
    for c in chunks:
        if runs and c == runs[-1][1] + 1:
            runs[-1][1] = c
        else:
            runs.append([c, c])
    return ",".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


def format_memory(report: dict) -> str:
    """One line per policy: the KV memory allocated (on the device and in host memory) and, for pools in another
    dtype than the model's (FP8) where the report has it, what the same cache takes with pools in the model's dtype
    and the pools' ratio."""
    model = report["meta"].get("dtype", "")
    lines = []
    for name, p in report["policies"].items():
        m = p.get("memory") or {}
        if not m:
            continue
        line = (f"KV memory, {name}: {m['kv_bytes'] / 2**20:.2f} MiB with {m['kv_dtype']} pools "
                f"(device {m['device_bytes'] / 2**20:.2f} MiB, host {m['host_bytes'] / 2**20:.2f} MiB)")
        if m["kv_dtype"] != model and "ratio" in m:
            line += (f" (pools and scales {m['pool_bytes'] / 2**20:.2f} MiB, {m['ratio']:.3f}x {model} pools); "
                     f"{m['kv_bytes_same_dtype'] / 2**20:.2f} MiB with {model} pools: "
                     f"{(m['kv_bytes_same_dtype'] - m['kv_bytes']) / 2**20:.2f} MiB saved")
        lines.append(line)
    return "\n".join(lines)


def format_timing_table(report: dict) -> str:
    """Per policy, each section's median [q1, q3] over the steady chunks (ms per chunk, summed over layers x
    passes), the whole chunk, and the chunk per video frame; "" when the report has no timing."""
    pols = {n: p for n, p in report["policies"].items() if p.get("timing") is not None}
    if not pols:
        return ""
    meta = report["meta"]

    def cell(q, digits=2):
        return "n/a" if q is None else f"{q['median']:.{digits}f} [{q['q1']:.{digits}f}, {q['q3']:.{digits}f}]"

    head = ["", *pols]
    rows = [["steady chunks", *(f"{_chunk_ranges(p['timing']['steady_chunks']) or 'none'} "
                                f"(n={len(p['timing']['steady_chunks'])})" for p in pols.values())]]
    for section in TABLE_ROWS:
        rows.append([SECTION_TITLES.get(section, section),
                     *(cell(p["timing"]["ms"] and p["timing"]["ms"].get(section)) for p in pols.values())])
    rows.append(["per video frame", *(cell(p["timing"]["ms_per_video_frame"], 3) for p in pols.values())])
    widths = [max(len(r[j]) for r in [head, *rows]) for j in range(len(head))]
    clock = f"timing: {meta.get('timing', '')}"
    if all(p["timing"]["ms"] is None for p in pols.values()):
        return (f"{clock}: no policy has {STEADY_MIN} steady chunks (after the first, doing the last chunk's work) "
                "to summarise; generate more chunks\n")
    lines = [f"{clock}; median [q1, q3] over the steady chunks (n/a under {STEADY_MIN}), ms per chunk, sections "
             "summed over layers x passes"]
    if _on_cpu(report):
        lines.append(f"note: {CPU_CAVEAT}")
    lines += ["  ".join(v.ljust(w) if j == 0 else v.rjust(w) for j, (v, w) in enumerate(zip(r, widths)))
              for r in [head, *rows]]
    return "\n".join(lines) + "\n"
