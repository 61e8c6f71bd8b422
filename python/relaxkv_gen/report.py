"""Rollout report: JSON (data), two PNGs and a printed timing table.

``report.png``: generation time per video frame and KV memory against the video frame each chunk ends at
(chunks are 3 latent frames for dense / sink / relax and 4 for pack, so per-chunk figures are not
comparable; one latent frame = 4 video frames). ``report_memory_map.png``: for every chunk and policy,
which earlier frames (and Pack compressed blocks) the chunk attends to, and what the cache still holds.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from .config import VIDEO_FRAMES_PER_LATENT
from .rollout import BLOCK_SECTIONS, SELF_ATTN_SECTIONS, RolloutResult

SECTION_TITLES = {"qkv": "qkv+norm", "rope_append": "rope+write", "select": "scoring", "compress": "compress",
                  "attention": "attention", "o_proj": "o-proj", "self_attn": "self-attn", "cross_attn": "cross-attn",
                  "ffn": "ffn"}
MIB = 2**20
CPU_LABEL = "CPU time, not a GPU measurement"
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


def build_report(results: list[RolloutResult], meta: dict) -> dict:
    """JSON-ready report: ``{"meta": {...}, "policies": {name: {"chunk_frames", "chunks": [...]}}}``."""
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
    timing = CPU_LABEL if str(meta.get("device", "")).startswith("cpu") else meta.get("timing", "")
    return (f"{meta.get('preset')} | backend {meta.get('backend')} | {meta.get('device')} ({meta.get('device_name')}) "
            f"| {meta.get('dtype')} | timing: {timing}")


def plot_report(report: dict, path) -> None:
    """Time per video frame and KV memory (in use, and the allocated cap) against the video frame (matplotlib Agg)."""
    plt = _pyplot()
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    pols = report["policies"]
    xs = {n: [_end_video_frame(c) for c in p["chunks"]] for n, p in pols.items()}
    live = {n: list(zip(xs[n], [c["kv_live_bytes"] for c in p["chunks"]])) for n, p in pols.items()}
    caps = {n: list(zip(xs[n], [c["kv_bytes"] for c in p["chunks"]])) for n, p in pols.items()}
    live_twin, cap_twin = _same_as(live), _same_as(caps)
    for i, (name, pol) in enumerate(pols.items()):
        style = dict(_style(name, i), markevery=max(1, len(pol["chunks"]) // 40))  # ~40 markers a line
        ms = [c["time_ms"] / (c["frames"] * VIDEO_FRAMES_PER_LATENT) for c in pol["chunks"]]
        ax_t.plot(xs[name], ms, label=f"{name} ({pol['chunk_frames']} latent frames / chunk)", **style)
        same = f" (same as {live_twin[name]})" if name in live_twin else ""
        ax_m.plot(xs[name], [b / MIB for _, b in live[name]], label=f"{name}: in use{same}", **style)
        same = f" (same as {cap_twin[name]})" if name in cap_twin else ""
        dashes = (6, 3) if name not in cap_twin else (2, 4)  # a coinciding cap: shorter dashes in the gaps
        ax_m.plot(xs[name], [b / MIB for _, b in caps[name]], color=style["color"], linestyle=(0, dashes),
                  linewidth=1.2, label=f"{name}: allocated = cap{same}")
    ax_t.set(xlabel="video frame (end of chunk; 4 video frames per latent frame)",
             ylabel="ms per video frame (chunk time / video frames)",
             title="Generation time per video frame (4 denoising + 1 refresh pass per chunk)")
    ax_m.set(xlabel="video frame (end of chunk; 4 video frames per latent frame)", ylabel="KV memory (MiB)",
             title="KV memory: in use (solid) and allocated cap (dashed)")
    ax_t.set_ylim(bottom=0)
    ax_m.set_ylim(bottom=0)
    for ax in (ax_t, ax_m):
        ax.grid(alpha=0.3)
        ax.set_xlim(left=0)
    ax_t.legend(fontsize=8)
    ax_m.legend(fontsize=7, ncol=2)
    fig.suptitle(_title(report), fontsize=9)
    fig.savefig(path, dpi=120)
    plt.close(fig)


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
    frames. Held frames are the plan's ``slot_pos``, held compressed blocks Pack's ``job.block_pos``.
    """
    pol = report["policies"][name]
    chunks, f_tokens, u = pol["chunks"][:max_chunks], frame_tokens(report), pol["chunk_frames"]
    n_frames = max(c["start_frame"] + c["frames"] for c in chunks)
    grid = np.full((len(chunks), n_frames), NOT_HELD, dtype=np.int8)
    candidates = []
    for row, c in enumerate(chunks):
        plan = c["plan"]
        job = plan.get("job") or {}
        cells = grid[row]

        def mark(frames, category):
            for fr in frames:
                if 0 <= fr < n_frames:
                    cells[fr] = max(cells[fr], category)

        mark((f for f in plan["slot_pos"] if f >= 0), HELD)
        mark((b + i for b in job.get("block_pos", []) if b >= 0 for i in range(u)), HELD_COMPRESSED)
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
        candidates += [(row, fr) for fr in job.get("candidates", [])]
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


def format_timing_table(report: dict) -> str:
    """Per-chunk section breakdown (summed over layers and the 5 passes) for every policy."""
    label = report["meta"].get("timing", "")
    cols = [*SELF_ATTN_SECTIONS, "self_attn", *BLOCK_SECTIONS]
    head = ["chunk", *[SECTION_TITLES[c] for c in cols], "chunk total", "KV in use MiB"]
    lines = []
    for name, pol in report["policies"].items():
        lines.append(f"policy {name} (chunk = {pol['chunk_frames']} latent frames) - {label}, "
                     "sections summed over layers x passes (ms)")
        rows = []
        for c in pol["chunks"]:
            t = c.get("timing_ms", {})
            rows.append([str(c["chunk"]), *[f"{t.get(k, float('nan')):.2f}" for k in cols],
                         f"{c['time_ms']:.2f}", f"{c['kv_live_bytes'] / MIB:.3f}"])
        if rows:
            n = len(rows)
            means = ["mean"]
            for j in range(1, len(head)):
                means.append(f"{sum(float(r[j]) for r in rows) / n:.{3 if j == len(head) - 1 else 2}f}")
            rows.append(means)
        widths = [max(len(head[j]), *(len(r[j]) for r in rows)) for j in range(len(head))]
        lines.append("  ".join(h.rjust(w) for h, w in zip(head, widths)))
        lines.extend("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in rows)
        lines.append("")
    return "\n".join(lines)
