"""Plot and Markdown table of the generator benchmark (JSON written by bench_generator.py).

A stacked time breakdown per policy, eager vs captured, in ms per video frame (chunks are 3 latent frames for dense /
sink / relax and 4 for pack).

    python -m benchmarks plot_generator benchmarks/results/generator_wan-1.3b_nvidia_h100_80gb_hbm3.json \
        --table benchmarks/results/GENERATOR.md

Writes the PNG beside each JSON (same stem) and, with ``--table``, the README's generator results section.
CPU results are labelled "CPU time, not a GPU measurement" in both.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import CPU_LABEL
from benchmarks.plots.figure import pyplot
from benchmarks.plots.figure import save
from benchmarks.plots.figure import title

VIDEO_FRAMES_PER_LATENT = 4
# one chunk's DiT time, summed over layers x passes, in parts that add up to the whole: everything not
# in a section (modulation, norms, residual adds, patch / time embedding, head, sampler) is "rest"
BREAKDOWN = ("qkv", "rope_append", "select", "compress", "attention", "o_proj", "cross_attn", "ffn", "rest")
BREAKDOWN_TITLES = {"qkv": "qkv + norm", "rope_append": "rope + cache write", "select": "selection",
                    "compress": "compress (pack)", "attention": "attention (incl. staging)", "o_proj": "o-proj",
                    "cross_attn": "cross-attention", "ffn": "FFN", "rest": "rest (modulation, norms, head, sampler)"}
KIND_TITLES = {"eager": "eager", "cuda_graph": "CUDA graph", "emulated (CPU)": "graph\n(CPU: emulated)",
               "torch.compile": "torch.compile"}
COLORS = dict(zip(BREAKDOWN, ("#4c78a8", "#72b7b2", "#f58518", "#ff9da6", "#e45756", "#54a24b", "#b279a2",
                              "#9d755d", "#bab0ac")))


def per_video_frame(ms_per_chunk: float, chunk_frames: int) -> float:
    return ms_per_chunk / (chunk_frames * VIDEO_FRAMES_PER_LATENT)


def plot(data: dict, png: str | Path) -> Path:
    """One group of bars per policy (eager, captured), each stacked by :data:`BREAKDOWN`, in ms per video frame.

    The stacks are the chunks timed section by section; a black tick marks the same mode timed without
    sections (the headline figure), whose video FPS is written above the bar.
    """
    plt = pyplot()
    policies = data["policies"]
    modes = list(dict.fromkeys(m for p in policies.values() for m in p["modes"]))
    width = 0.8 / max(1, len(modes))
    fig, ax = plt.subplots(figsize=(2.2 + 1.9 * len(policies), 5.4))
    labelled, ticks = set(), []
    for i, (name, pol) in enumerate(policies.items()):
        u = pol["chunk_frames"]
        for j, mode in enumerate(modes):
            res = pol["modes"].get(mode)
            if not res or res.get("ms_per_chunk") is None:
                continue
            x = i + (j - (len(modes) - 1) / 2) * width
            ticks.append((x, KIND_TITLES.get(res["kind"], res["kind"])))
            bottom = 0.0
            parts = res.get("breakdown_ms") or {"total (no breakdown)": res["ms_per_chunk"]}
            for part, ms in parts.items():
                height = per_video_frame(max(ms, 0.0), u)
                label = BREAKDOWN_TITLES.get(part, part)
                ax.bar(x, height, width * 0.92, bottom=bottom, color=COLORS.get(part, "#dddddd"), edgecolor="white",
                       linewidth=0.4, label=None if label in labelled else label)
                labelled.add(label)
                bottom += height
            top = per_video_frame(res["ms_per_chunk"], u)
            ax.plot([x - width * 0.46, x + width * 0.46], [top, top], color="black", linewidth=1.5,
                    label=None if "timed" in labelled else "timed without sections (headline)")
            labelled.add("timed")
            ax.text(x, max(top, bottom), f"{res['video_fps']:.3g}\nfps", ha="center", va="bottom", fontsize=7)
        ax.text(i, -0.13, f"{name}\n({u} latent frames / chunk)", transform=ax.get_xaxis_transform(), ha="center",
                va="top", fontsize=8)
    ax.set_xticks([x for x, _ in ticks], [t for _, t in ticks], fontsize=7)
    ax.set_ylabel("ms per video frame (chunk time / video frames in it)")
    targets = [t for t in data.get("targets", []) if t.get("per_video_frame_ms")]
    if targets and not data["env"].get("cpu_timing"):
        ax.axhline(targets[0]["per_video_frame_ms"], color="black", linestyle="--", linewidth=0.8,
                   label=targets[0]["target"])
    ax.set_ylim(top=ax.get_ylim()[1] * 1.12)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    what = f"Wan2.1 causal DiT '{data['preset']}', DiT time per video frame (5 forward passes per chunk)"
    return save(fig, title(data, what), png)


def _cell(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}g}" if abs(x) < 10**digits else f"{x:.0f}"


def markdown(data: dict) -> str:
    """The README's generator results section for one run (device, date and commit in the heading)."""
    env, pols = data["env"], data["policies"]
    capture = sorted({p["modes"]["graph"]["kind"] for p in pols.values() if "graph" in p["modes"]})
    lines = [f"### Generator end to end: {data['preset']} DiT per chunk ({env['device']}, {env['date'][:10]}, "
             f"commit {env['commit'][:10]})", ""]
    if env.get("cpu_timing"):
        lines += [f"**{CPU_LABEL}.**", ""]
    lines += [f"`python -m benchmarks generator{' --quick' if data.get('quick') else ''}`: random weights, "
              f"batch {data['batch']}, {data['dtype']}, backend {data['backend']}, steady state, whole chunks of "
              f"{data['passes_per_chunk']} forward passes (4 denoising + refresh), DiT only (no VAE, no text encoder); "
              f"one latent frame = 4 video frames. Captured mode: {', '.join(capture) or 'none'}.", "",
              "| policy | latent frames / chunk | eager ms / chunk | captured ms / chunk | ms / video frame | "
              "video FPS | speed vs dense | replay == eager |", "|---|---|---|---|---|---|---|---|"]
    best = {n: p["modes"].get("graph") or p["modes"]["eager"] for n, p in pols.items()}
    for name, pol in pols.items():
        eager, graph, b = pol["modes"]["eager"], pol["modes"].get("graph"), best[name]
        dense = best.get("dense")
        ratio = dense["ms_per_video_frame"] / b["ms_per_video_frame"] if dense else None
        same = {True: "yes", False: "**no**", None: "-"}[graph.get("replay_equals_eager") if graph else None]
        lines.append(f"| {name} | {pol['chunk_frames']} | {_cell(eager['ms_per_chunk'])} | "
                     f"{_cell(graph['ms_per_chunk']) if graph else '-'} | {_cell(b['ms_per_video_frame'])} | "
                     f"{_cell(b['video_fps'])} | {_cell(ratio)}x | {same} |")
    lines += ["", "Breakdown of the captured mode (eager where none), ms per chunk summed over layers x passes:", "",
              "| policy | " + " | ".join(BREAKDOWN_TITLES[p] for p in BREAKDOWN) + " |",
              "|---|" + "---|" * len(BREAKDOWN)]
    for name, b in best.items():
        parts = b.get("breakdown_ms") or {}
        lines.append(f"| {name} | " + " | ".join(_cell(parts.get(p)) for p in BREAKDOWN) + " |")
    lines.append("")
    for g in data.get("targets", []):
        met = {True: "met", False: "**not met**", None: "not judged (CPU)"}[g["met"]]
        lines.append(f"- {g['target']}, {g['mode']} ({g['kind']}): {_cell(g['value'])}, {met}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> list[Path]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", type=Path, help="generator_*.json files")
    p.add_argument("--table", type=Path, help="write the Markdown results section(s) here")
    args = p.parse_args(argv)
    runs = [(path, json.loads(path.read_text())) for path in args.results]
    if args.table:
        args.table.write_text("\n".join(markdown(data) for _, data in runs))
    return [plot(data, path.with_suffix(".png")) for path, data in runs]


if __name__ == "__main__":
    for png in main():
        print(png)
