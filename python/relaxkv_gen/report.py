"""Rollout report: JSON (data), PNG (per-chunk time and KV memory) and a printed timing table."""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from .rollout import SECTIONS, RolloutResult

SECTION_TITLES = {"qkv": "qkv+norm", "rope_append": "rope+write", "select": "scoring", "compress": "compress",
                  "attention": "attention", "o_proj": "o-proj", "self_attn": "self-attn"}
MIB = 2**20


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


def plot_report(report: dict, path) -> None:
    """Per-chunk wall time and KV-cache memory vs chunk index, one line per policy (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for name, pol in report["policies"].items():
        idx = [c["chunk"] for c in pol["chunks"]]
        ax_t.plot(idx, [c["time_ms"] for c in pol["chunks"]], marker="o", ms=3, label=name)
        ax_m.plot(idx, [c["kv_live_bytes"] / MIB for c in pol["chunks"]], marker="o", ms=3, label=name)
    meta = report["meta"]
    ax_t.set(xlabel="chunk index", ylabel="time per chunk (ms)", title="chunk time (5 passes)")
    ax_m.set(xlabel="chunk index", ylabel="KV in use (MiB)", title="K/V rows the memory still holds after the chunk")
    for ax in (ax_t, ax_m):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"{meta.get('preset')} | backend {meta.get('backend')} | {meta.get('device')} ({meta.get('device_name')}) "
        f"| {meta.get('dtype')}",
        fontsize=9,
    )
    fig.savefig(path, dpi=120)
    plt.close(fig)


def format_timing_table(report: dict) -> str:
    """Per-chunk self-attention breakdown (summed over layers and the 5 passes) for every policy."""
    label = report["meta"].get("timing", "")
    cols = [*SECTIONS, "self_attn"]
    head = ["chunk", *[SECTION_TITLES[c] for c in cols], "chunk total", "KV in use MiB"]
    lines = []
    for name, pol in report["policies"].items():
        lines.append(f"policy {name} (chunk = {pol['chunk_frames']} latent frames) - {label}, "
                     "self-attention sections summed over layers x passes")
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
